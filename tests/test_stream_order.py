"""CUDA's ordering rules on the CPU: the side-stream paths (ConAdv for tau 0, 1 and 2, resume
inside and after the first tau steps, teachers on the side stream, DALI batches) run under the
checker of tests/stream_order.py, which fails on any cross-stream access that a GPU would not
order, and give the sequential executor's numbers bit for bit. Also the host-read proxy: the
training step reads no device value on the host, and fit() only at logging steps."""

from contextlib import nullcontext

import pytest
import torch

from conadv.adversarial import executors
from conadv.distributed import DistEnv
from conadv.train.job import train
from conadv.train.trainer import Trainer
from tests.helpers import (
    CPU,
    SINGLE,
    assert_same_run_state,
    checkpoint_state,
    fit,
    teacher_files,
    tiny_config,
)
from tests.stream_order import StreamOrderError, checked_streams


def checked_train(run_dir, *overrides) -> dict:
    """train() with the attack's side stream on the checker's streams; the data loader's work
    is host work, as it is on a GPU (pinned host batches)."""
    with checked_streams(watch_host_reads=False) as checker, checker.host_data():
        return train(tiny_config(run_dir, "adv.executor=stream", *overrides))


def sequential_train(run_dir, *overrides) -> dict:
    return train(tiny_config(run_dir, "adv.executor=sequential", *overrides))


BROKEN = {
    "no wait for the weights": ("after_optimizer_step",
                                lambda self: setattr(self, "_weights_ready",
                                                     self.streams.new_event())),
    "no wait for the attack's result": ("consume", lambda self, launched: launched.value),
    "optimizer step while attacks read": ("before_optimizer_step", lambda self: None),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_checker_fails_a_missing_edge(tmp_path, monkeypatch, broken):
    method, replacement = BROKEN[broken]
    monkeypatch.setattr(executors.StreamExecutor, method, replacement)
    with pytest.raises(StreamOrderError):
        # no logging step in between: the host waiting for the main stream there orders
        # every later launch after it, as on a GPU
        checked_train(tmp_path, "adv.enabled=true", "train.max_steps=3", "log.every_steps=10")


@pytest.mark.parametrize("tau", [0, 1, 2])
def test_conadv_on_the_side_stream_keeps_the_rules_and_the_sequential_numbers(tmp_path, tau):
    run = ["adv.enabled=true", f"adv.tau={tau}", "train.max_steps=5", "train.accumulation=2"]
    checked_train(tmp_path / "stream", *run)
    sequential_train(tmp_path / "sequential", *run)
    assert_same_run_state(checkpoint_state(tmp_path / "sequential"),
                          checkpoint_state(tmp_path / "stream"))


@pytest.mark.parametrize("stop_at, accumulation", [(1, 1), (4, 2)],
                         ids=["inside-first-tau", "after-first-tau"])
def test_a_resume_replays_its_attacks_in_stream_order(tmp_path, stop_at, accumulation):
    """tau = 2: the replayed attacks read saved weights of two source steps through one
    replica, reloaded on the side stream after the attack that read it before."""
    run = ["adv.enabled=true", "adv.tau=2", "train.max_steps=6", "checkpoint.every_steps=100",
           f"train.accumulation={accumulation}"]
    sequential_train(tmp_path / "straight", *run)
    checked_train(tmp_path / "split", *run, f"train.stop_at_step={stop_at}")
    resumed = checked_train(tmp_path / "split", *run, "checkpoint.resume=auto")
    assert resumed["resumed_from"].endswith(f"step-{stop_at:08d}")
    assert_same_run_state(checkpoint_state(tmp_path / "straight"),
                          checkpoint_state(tmp_path / "split"))


@pytest.mark.parametrize("adv", ["true", "false"])
def test_teachers_on_the_side_stream_keep_the_rules(tmp_path, adv):
    run = ["distill.enabled=true", teacher_files(tmp_path), "distill.discriminator=true",
           f"adv.enabled={adv}", "train.max_steps=4"]
    checked_train(tmp_path / "stream", *run)
    sequential_train(tmp_path / "sequential", *run)
    assert_same_run_state(checkpoint_state(tmp_path / "sequential"),
                          checkpoint_state(tmp_path / "stream"))


def _dali_run(tmp_path) -> list[str]:
    from tests.helpers import THREE_VIEWS, jpeg_folder

    jpeg_folder(tmp_path / "data", classes=3, per_class=8, photo_like=True)
    return ["data.name=imagefolder", f"data.root={tmp_path / 'data'}", *THREE_VIEWS,
            "data.image_size=32", "data.eval_resize=36", "train.global_batch=6",
            "train.max_steps=4"]


def test_dali_batches_are_waited_for_by_every_stream_that_reads_them(tmp_path):
    """On a GPU the DALI batch (the crops and the AutoAugment view made from them) is written
    on the loader's copy stream: the attack's side stream and the main stream each wait for
    its event."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    run = _dali_run(tmp_path)
    checked_train(tmp_path / "stream", *run)
    sequential_train(tmp_path / "sequential", *run)
    assert_same_run_state(checkpoint_state(tmp_path / "sequential"),
                          checkpoint_state(tmp_path / "stream"))


# ------------------------------------------------------------------ host reads

@pytest.mark.parametrize("optimizer", ["sgd", "lars", "lamb"])
@pytest.mark.parametrize("adv", ["true", "false"])
def test_a_training_step_reads_no_device_value_on_the_host(tmp_path, optimizer, adv):
    with checked_streams() as checker, checker.host_data():
        trainer = Trainer(tiny_config(tmp_path, f"optim.name={optimizer}", f"adv.enabled={adv}",
                                      "adv.executor=stream", "train.max_steps=4"), SINGLE, CPU)
        for _ in range(3):
            with checker.no_host_sync():
                trainer.train_step()
    assert checker.host_reads == []


def test_the_host_read_proxy_sees_the_reads_a_gpu_would_wait_for(tmp_path):
    with checked_streams() as checker, checker.host_data():
        trainer = Trainer(tiny_config(tmp_path, "train.max_steps=2"), SINGLE, CPU)
        loss = trainer.train_step().loss
        with checker.no_host_sync():
            float(loss), loss.tolist(), loss.cpu(), loss.to("cpu"), f"{loss}", loss.numpy()
            torch.equal(loss, loss), (loss > 0).nonzero()
            loss.to(trainer.device), loss + 1  # moves within the device are fine
    kinds = {read.split(" ")[0] for read in checker.host_reads}
    assert kinds == {"_local_scalar_dense", "Tensor.tolist", "Tensor.cpu", "Tensor.to",
                     "Tensor.__format__", "Tensor.numpy", "equal", "nonzero"}, kinds
    assert all("test_stream_order.py" in read for read in checker.host_reads), checker.host_reads


def test_fit_reads_device_values_on_the_host_only_at_logging_steps(tmp_path, monkeypatch):
    """A single process used to agree on stop requests with a device all-reduce and .item()
    after every step."""
    original = Trainer.train_step

    def train_step(self):
        self._checker.marks.update(phase="in a step", step=self.step + 1)
        result = original(self)
        self._checker.marks.update(phase="after", step=self.step)
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with checked_streams() as checker, checker.host_data():
        trainer = Trainer(tiny_config(tmp_path, "train.max_steps=9", "log.every_steps=4",
                                      "adv.enabled=true", "adv.executor=stream"), SINGLE, CPU)
        trainer._checker = checker
        with checker.no_host_sync():
            fit(trainer)
    steps = {read.split("'step': ")[1].split("}")[0] for read in checker.host_reads}
    assert checker.host_reads and steps <= {"4", "8", "9"}, checker.host_reads
    assert not [r for r in checker.host_reads if "in a step" in r], checker.host_reads


# ------------------------------------------------------------------ asynchronous work and
# pinned host memory: each rule of the checker fails a deliberately broken line of the project

@pytest.fixture
def one_rank_group():
    """A one-process gloo group: the collectives' code paths, in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _agree_three_times() -> None:
    from conadv.train.preemption import _Agreement

    agreement = _Agreement(CPU)
    for level in (0, 2, 0):
        agreement.exchange(level)
    agreement.finish(wait=True)


def test_the_stop_agreement_keeps_the_rules_of_async_work_and_pinned_memory(one_rank_group):
    with checked_streams(watch_host_reads=False):
        _agree_three_times()


def _exchange_without_waiting_for_the_all_reduce(self, level):
    """conadv/train/preemption.py's _Agreement.exchange without `self.work.wait()`."""
    from conadv.train.preemption import all_reduce_max_async

    agreed = self._collect()
    self.flag.fill_(level)
    self.work = all_reduce_max_async(self.flag)
    self.host.copy_(self.flag, non_blocking=True)
    self.ready = self.streams.new_event()
    self.ready.record(self.streams.current())
    return agreed


def _collect_without_the_event(self):
    """_Agreement._collect reading the pinned copy without `self.ready.synchronize()`."""
    if self.work is None:
        return 0
    value = int(self.host[0])
    self.work = None
    return value


@pytest.mark.parametrize("method, broken, message", [
    ("exchange", _exchange_without_waiting_for_the_all_reduce,
     "stream 'main' reads a \\(1,\\) int32 tensor written on stream 'allreduce_ work'"),
    ("_collect", _collect_without_the_event,
     "the host reads a pinned \\(1,\\) int32 buffer that stream 'main' may still be writing"),
], ids=["async-collective", "pinned-device-to-host"])
def test_the_checker_fails_a_broken_stop_agreement(one_rank_group, monkeypatch, method, broken,
                                                   message):
    from conadv.train.preemption import _Agreement

    monkeypatch.setattr(_Agreement, method, broken)
    with pytest.raises(StreamOrderError, match=message):
        with checked_streams(watch_host_reads=False):
            _agree_three_times()


class _Store:
    def add(self, key, value):
        return 0


def _control_words_twice(link) -> None:
    kept = []  # the pinned buffers, alive until their broadcasts are done
    for step in (1, 2):
        word = link._control([1, step, step, step, 10], kept)
        word + 1  # the broadcast reads it on the stream


def _control_from_one_staging_buffer(self, words, keep):
    """AttackLink._control rewriting one pinned staging buffer instead of a fresh one."""
    from conadv.streams import streams_for

    if not hasattr(self, "_staging"):
        self._staging = streams_for(self.device).pin(torch.zeros(len(words), dtype=torch.int64))
    for index, word in enumerate(words):
        self._staging[index].fill_(word)
    return self._staging.to(self.device, non_blocking=True)


@pytest.mark.parametrize("broken", [False, True], ids=["as-written", "one-staging-buffer"])
def test_the_checker_fails_a_pinned_buffer_rewritten_under_its_copy(monkeypatch, broken):
    from conadv.adversarial.attack_ranks import AttackLink
    from conadv.distributed import JobGroups

    if broken:
        monkeypatch.setattr(AttackLink, "_control", _control_from_one_staging_buffer)
    env = DistEnv("torchrun", 0, 2, 0, "127.0.0.1", 1)
    groups = JobGroups(trainers=None, weights=None, headers=None, store=_Store())
    link = AttackLink(tiny_config("/tmp", "adv.enabled=true").adv, groups, env, 1, 100, CPU)
    try:
        with pytest.raises(StreamOrderError, match="the host overwrites a pinned \\(5,\\) int64 "
                                                   "buffer that stream 'main' may still be "
                                                   "copying from") if broken else nullcontext():
            with checked_streams(watch_host_reads=False):
                _control_words_twice(link)
    finally:
        link._heartbeat.stop()


def test_a_logging_step_waits_for_the_main_stream_and_nothing_else(tmp_path):
    """window_record waits for the steps it times, not for the attacks in flight on the side
    stream (a device-wide synchronize would)."""
    from conadv.train.step_metrics import MetricWindow

    with checked_streams(watch_host_reads=False) as checker, checker.host_data():
        trainer = Trainer(tiny_config(tmp_path, "adv.enabled=true", "adv.tau=1",
                                      "adv.executor=stream", "train.max_steps=4"), SINGLE, CPU)
        window = MetricWindow(CPU)
        for _ in range(2):
            window.add(trainer.train_step())
        side = trainer.engine.executor.stream
        side_work_before = side.position()
        trainer.engine.feed(*trainer.stream.next(), trainer.step)  # an attack in flight
        assert side.position() > side_work_before
        main_work, side_seen = checker.main.position(), checker.main.clock.get(side.id, 0)
        trainer.window_record(window, 0)
        assert checker.host_clock.get(checker.main.id, 0) >= main_work  # the steps are done
        assert checker.host_clock.get(side.id, 0) <= side_seen  # the attack in flight is not


def test_the_checker_fails_a_dali_run_that_overwrites_buffers_still_being_copied(tmp_path,
                                                                               monkeypatch):
    """conadv/data/dali.py's _Decoder.run without `self._cloned.synchronize()`: the next
    pipeline run reuses DALI's buffers while the copy stream may still be cloning them."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from conadv.data import dali

    original = dali._Decoder.run

    def run_without_waiting_for_the_clone(self, *args, **kwargs):
        self._cloned = None  # the line that waits for it is skipped
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dali._Decoder, "run", run_without_waiting_for_the_clone)
    with pytest.raises(StreamOrderError, match="DALI's next run overwrites the output buffers "
                                               "that stream 'side"):
        checked_train(tmp_path / "stream", *_dali_run(tmp_path))
