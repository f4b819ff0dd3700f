"""Failures that must not lose work: non-finite training, failed checkpoint writes, termination
signals, and a failing rank under torchrun."""

import errno
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conadv.adversarial.engine import ViewEngine
from conadv.distributed import DistEnv
from conadv.errors import CheckpointWriteError, TrainingDiverged
from conadv.train import checkpoint as checkpoint_module
from conadv.train import objectives, preemption
from conadv.train.job import train
from conadv.train.nonfinite import NonFiniteGuard, first_non_finite
from conadv.train.preemption import StopRequest
from conadv.train.trainer import Trainer
from tests.helpers import (
    REPO,
    SINGLE,
    TINY,
    assert_same_run_state,
    checkpoint_state,
    children_of,
    fit,
    free_port,
    newest_checkpoint,
    poison_loss_at,
    run_module,
    signal_job,
    subprocess_env,
    the_error_line,
    tiny_config,
)


def _optimizer_tensors(trainer) -> dict:
    state = {f"param.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    for i, s in enumerate(trainer.optimizer.state.values()):
        for k, v in s.items():
            state[f"state.{i}.{k}"] = v.detach().clone()
    return state


# ------------------------------------------------------------------ non-finite training


@pytest.mark.slow
def test_a_diverging_demo_run_stops_within_a_logging_window_and_resumes(tmp_path):
    """A good start, then optim.lr=1e6 (a NaN late in a run), then a resume with the sane
    config from the newest finite checkpoint; logging every 20 steps, as the demo does."""
    run = [*TINY, f"log.run_dir={tmp_path}", "checkpoint.every_steps=20",
           "log.every_steps=20", "adv.enabled=true", "train.max_steps=30",
           "train.eval_every_epochs=0"]
    good = run_module("conadv.cli.train", *run, "train.stop_at_step=10")
    assert good.returncode == 0, good.stderr[-2000:]

    diverged = run_module("conadv.cli.train", *run, "optim.lr=1e6", "checkpoint.resume=auto",
                          "checkpoint.allow_config_change=true")
    error = the_error_line(diverged)
    match = re.search(r"non-finite (?:at|between) steps? (\d+)(?: and (\d+))?", error)
    assert match, error
    last_bad = int(match.group(2) or match.group(1))
    assert last_bad <= 20  # logged every 20 steps: stopped within the first window
    newest = newest_checkpoint(tmp_path)
    assert newest.name == "step-00000010" and str(newest) in error
    assert first_non_finite(checkpoint_state(tmp_path)) is None

    resumed = run_module("conadv.cli.train", *run, "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"] == str(newest) and summary["finished"]
    assert first_non_finite(checkpoint_state(tmp_path)) is None


def test_stop_policy_names_the_step_and_the_newest_finite_checkpoint(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, {2})
    with pytest.raises(TrainingDiverged, match="at step 3") as caught:
        train(tiny_config(tmp_path, "train.max_steps=6", "checkpoint.every_steps=1",
                          "log.every_steps=10"))
    assert str(tmp_path / "checkpoints" / "step-00000002") in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002"]  # no checkpoint of the poisoned weights


@pytest.mark.parametrize("adv", [[], ["adv.enabled=true"]], ids=["vanilla", "conadv"])
def test_skip_policy_undoes_a_poisoned_step_on_the_device(tmp_path, monkeypatch, adv):
    poison_loss_at(monkeypatch, {2})
    trainer = Trainer(tiny_config(tmp_path, "train.on_nonfinite=skip", "train.max_steps=5",
                                  "optim.name=lamb", "optim.lr=0.01", *adv), SINGLE,
                      torch.device("cpu"))
    trainer.train_step()
    trainer.train_step()
    before = _optimizer_tensors(trainer)
    trainer.train_step()  # the poisoned one
    after = _optimizer_tensors(trainer)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # weights and LAMB moments/step untouched
    trainer.train_step()
    moved = _optimizer_tensors(trainer)
    assert not torch.equal(moved["param.backbone.fc.weight"], after["param.backbone.fc.weight"])


def _poison_images_at(monkeypatch, calls: set[int]) -> None:
    """Make the training images infinite at the given (0-based) micro-step calls: the forward
    writes inf/NaN into every BatchNorm's running statistics, as an overflow does."""
    original = ViewEngine._assemble
    counter = {"n": 0}

    def assemble(self, *args, **kwargs):
        inputs = original(self, *args, **kwargs)
        if counter["n"] in calls:
            inputs.images = inputs.images * float("inf")
        counter["n"] += 1
        return inputs

    monkeypatch.setattr(ViewEngine, "_assemble", assemble)


def test_skip_policy_restores_the_batchnorm_statistics_of_a_skipped_step(tmp_path,
                                                                          monkeypatch):
    _poison_images_at(monkeypatch, {2})
    trainer = Trainer(tiny_config(tmp_path, "train.on_nonfinite=skip", "train.max_steps=4",
                                  "adv.enabled=true", "checkpoint.every_steps=1"), SINGLE,
                      torch.device("cpu"))
    trainer.train_step()
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert any(".aux.adv.running_var" in k for k in before)  # the auxiliary BN is covered
    trainer.train_step()  # the poisoned one
    after = trainer.model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    summary = fit(trainer)
    assert summary["finished"] and summary["skipped_steps"] == 1
    assert math.isfinite(summary["final_eval"]["loss"])
    assert first_non_finite(checkpoint_state(tmp_path)) is None


def test_skip_policy_finishes_and_reports_the_skipped_step(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, {2})
    summary = train(tiny_config(tmp_path, "train.on_nonfinite=skip", "train.max_steps=5",
                                "checkpoint.every_steps=1"))
    assert summary["finished"] and summary["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["kind"] == "train"] == [0, 0, 1, 1, 1]
    assert first_non_finite(checkpoint_state(tmp_path)) is None


def test_skip_policy_stops_after_too_many_skipped_steps_in_a_row(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, {1, 2, 3})
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row were skipped"):
        train(tiny_config(tmp_path, "train.on_nonfinite=skip", "train.max_skipped_steps=2",
                          "train.max_steps=6"))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_the_guard_counts_bad_steps_and_runs_across_folds_and_polls(monkeypatch, policy):
    """The per-step flags are counted on the device only every few steps and at polls: the
    counts must be those of the plain sequence, however the folds and polls cut it."""
    from conadv.train import nonfinite

    monkeypatch.setattr(nonfinite, "FOLD_EVERY", 3)
    generator = torch.Generator().manual_seed(5)
    flags = (torch.rand(200, generator=generator) < 0.4).tolist()
    polls = set(torch.randint(0, 200, (25,), generator=generator).tolist())
    guard = nonfinite.NonFiniteGuard(torch.device("cpu"), policy, check_gradients=False)
    window = run = longest = skipped = 0
    for index, bad in enumerate(flags):
        guard.optimizer_step(lambda: None, torch.tensor(bad), [])
        window, run = window + bad, (run + 1 if bad else 0)
        longest, skipped = max(longest, run), skipped + (bad and policy == "skip")
        if index in polls or index == len(flags) - 1:
            status = guard.poll()
            assert (status.bad_steps, status.longest_run, status.skipped_total) == (
                window, longest, skipped), index
            window = 0


def test_the_skip_snapshot_puts_back_every_layout_and_dtype_only_where_the_step_was_bad():
    """Channels-last weights keep their strides in the snapshot (multi-tensor copies need
    matching layouts), integer buffers their dtype; a good step keeps the new values."""
    from conadv.train.nonfinite import _restore_where, _Snapshot

    tensors = [torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last),
               torch.randn(5), torch.tensor(7), torch.randn(6, 4)[:, ::2]]
    snapshot = _Snapshot(tensors)
    assert [v.stride() for v in snapshot.saved_views[:3]] == [t.stride() for t in tensors[:3]]
    before = [t.clone() for t in tensors]
    snapshot.save()
    for step_was_bad in (False, True):
        for tensor in tensors:
            tensor.add_(1)
        after = [t.clone() for t in tensors]
        _restore_where(torch.tensor(step_was_bad), [snapshot])
        expected = before if step_was_bad else after
        assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
        snapshot.save()
        before = [t.clone() for t in tensors]


def test_the_guard_sees_a_non_finite_loss_or_gradient_and_nothing_else():
    guard = NonFiniteGuard(torch.device("cpu"), "stop", check_gradients=True)
    weight = torch.nn.Parameter(torch.ones(3))
    for loss, grad, bad in [(1.0, 1e3, False), (float("nan"), 1.0, True),
                            (1.0, float("inf"), True), (float("-inf"), 0.0, True),
                            (3e38, 0.0, False), (float("nan"), None, True), (2.0, None, False)]:
        weight.grad = None if grad is None else torch.full((3,), grad)
        flag = guard.step_is_bad(torch.tensor(loss), [weight])
        assert flag.dtype == torch.bool and bool(flag) is bad, (loss, grad)


def _one_rank_goes_non_finite(rank: int, world: int, run_dir: str, overrides: tuple) -> dict:
    """A gloo rank of a job whose loss is non-finite on rank 1 alone at step 3; the gradients
    stay finite (as under fp16, or a distillation target of probability 0), so only the flag
    tells the ranks. Returns what this rank ended with."""
    from conadv.errors import TrainingDiverged

    original = objectives.weighted_views

    def loss(view_loss, logits, inputs):
        value, stats = original(view_loss, logits, inputs)
        if rank == 1 and trainer.step == 2:
            value = value + value.detach() * float("inf")
        return value, stats

    objectives.weighted_views = loss
    env = DistEnv("torchrun", rank, world, rank, "127.0.0.1", 0)
    trainer = Trainer(tiny_config(run_dir, "train.max_steps=5", "log.every_steps=10",
                                  "train.deterministic=false", *overrides), env,
                      torch.device("cpu"))
    try:
        summary = fit(trainer)
        error = None
    except TrainingDiverged as err:
        summary, error = None, str(err)
    # numpy arrays: tensors would travel as shared memory that dies with this process
    state = {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}
    for i, part in enumerate(trainer.optimizers):
        for n, values in enumerate(part.state_dict()["state"].values()):
            state.update({f"optimizer{i}.{n}.{k}": v.numpy().copy() for k, v in values.items()
                          if isinstance(v, torch.Tensor)})
    return {"state": state, "step": trainer.step, "error": error,
            "skipped": summary["skipped_steps"] if summary else None}


SKIP_CASES = {"fp32": ["train.on_nonfinite=skip"],
              "distillation": ["train.on_nonfinite=skip", "distill.enabled=true",
                               "distill.discriminator=true"]}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(tmp_path, case):
    from tests.helpers import run_gloo_ranks, teacher_files

    overrides = tuple(SKIP_CASES[case]) + (
        (teacher_files(tmp_path),) if "distill" in case else ())
    ranks = run_gloo_ranks(2, functools.partial(_one_rank_goes_non_finite,
                                                run_dir=str(tmp_path / "run"),
                                                overrides=overrides), tmp_path)
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    for key, value in ranks[0]["state"].items():  # the replicas are still one model
        assert (value == ranks[1]["state"][key]).all(), key


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_sentence(tmp_path):
    from tests.helpers import run_gloo_ranks

    ranks = run_gloo_ranks(2, functools.partial(_one_rank_goes_non_finite,
                                                run_dir=str(tmp_path / "run"), overrides=()),
                           tmp_path)
    assert ranks[0]["error"] == ranks[1]["error"] and "non-finite" in ranks[0]["error"]
    assert ranks[0]["step"] == ranks[1]["step"]


# ------------------------------------------------------------------ failed checkpoint writes


def test_a_failed_checkpoint_write_is_one_sentence_and_the_run_resumes(tmp_path, monkeypatch):
    original = checkpoint_module._save_file
    writes = {"n": 0}

    def full_disk(path, obj):
        writes["n"] += 1
        if writes["n"] == 2:
            with open(path, "wb") as handle:  # a partly written file, as a full disk leaves
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(path, obj)

    monkeypatch.setattr(checkpoint_module, "_save_file", full_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        train(tiny_config(tmp_path, "train.max_steps=4", "checkpoint.every_steps=1"))
    message = str(caught.value)
    assert "No space left on device" in message and "MiB free there" in message
    assert f"the newest intact checkpoint is {tmp_path / 'checkpoints' / 'step-00000001'}" in (
        message)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]

    monkeypatch.setattr(checkpoint_module, "_save_file", original)
    resumed = train(tiny_config(tmp_path, "train.max_steps=4", "checkpoint.every_steps=1",
                                "checkpoint.resume=auto"))
    assert resumed["resumed_from"].endswith("step-00000001") and resumed["finished"]


def test_leftovers_of_a_crashed_write_are_removed_at_start(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-00000007.partial").mkdir(parents=True)
    (checkpoints / "step-00000007.partial" / "state.pt.tmp").write_bytes(b"x")
    (checkpoints / "stray.tmp").write_bytes(b"x")
    train(tiny_config(tmp_path, "train.max_steps=1"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001"]


@pytest.mark.slow
def test_a_full_tmpfs_stops_the_cli_with_one_line(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        result = run_module("conadv.cli.train", *TINY, f"log.run_dir={mount}",
                            "train.max_steps=6", "checkpoint.every_steps=1",
                            "checkpoint.keep_last=10", "model.cifar_width=16")
        error = the_error_line(result)
        assert "No space left on device" in error
        assert "the newest intact checkpoint is" in error
        assert not list((mount / "checkpoints").glob("*.partial"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------ termination signals

SIGNAL_RUN = [*TINY, "train.max_steps=40", "checkpoint.every_steps=1000", "log.every_steps=1",
              "data.workers=2"]


def _train_record_count(run_dir) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"kind": "train"') if metrics.exists() else 0


def _wait_for_train_records(run_dir, count: int, process, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= count:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("training did not start")


def _start(args: list[str], torchrun: int = 0) -> subprocess.Popen:
    """The CLI, or launch/torchrun.sh with `torchrun` ranks, in a session of its own."""
    if torchrun:
        cmd = [str(REPO / "launch/torchrun.sh"), "--nproc-per-node", str(torchrun), "--", *args]
    else:
        cmd = [sys.executable, "-m", "conadv.cli.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(PYTHON=sys.executable), text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,  # no terminal
                            preexec_fn=_sigint_as_a_user_has_it)


def _sigint_as_a_user_has_it() -> None:
    """A suite started in the background of a script inherits an ignored SIGINT (and so would
    the CLI, which then rightly leaves it ignored); a user's shell or launcher does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """The uninterrupted SIGNAL_RUN on 1 process or 2 ranks, each made once."""
    made: dict[int, Path] = {}

    def run(ranks: int) -> Path:
        if ranks not in made:
            run_dir = tmp_path_factory.mktemp(f"straight{ranks}")
            process = _start([*SIGNAL_RUN, f"log.run_dir={run_dir}"], ranks)
            assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
            made[ranks] = run_dir
        return made[ranks]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("ranks, signum", [(0, signal.SIGTERM), (2, signal.SIGTERM),
                                           (2, signal.SIGUSR1)],
                         ids=["single-term", "torchrun2-term", "torchrun2-usr1"])
def test_a_signal_to_every_process_checkpoints_and_resumes_bit_identical(tmp_path, ranks,
                                                                          signum,
                                                                          straight_runs):
    """As Slurm delivers it: to the launcher, torchrun's agent (which passes SIGTERM on once
    more), the ranks and their DataLoader workers (data.workers=2), all at once."""
    straight = straight_runs(ranks)

    run_dir = tmp_path / "split"
    process = _start([*SIGNAL_RUN, f"log.run_dir={run_dir}"], ranks)
    _wait_for_train_records(run_dir, 5, process)
    signalled = signal_job(process.pid, signum)
    assert len(signalled) >= (1 + 2 * 3 if ranks else 3)  # DataLoader workers included
    _, err = process.communicate(timeout=120)
    terminated = signum == signal.SIGTERM
    assert process.returncode == (75 if terminated else 0), err[-3000:]
    assert "exited unexpectedly" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["terminated"] == terminated and not summary["finished"], summary
    stopped_at = summary["steps"]
    assert 5 <= stopped_at < 40
    assert newest_checkpoint(run_dir).name == f"step-{stopped_at:08d}"

    resumed = _start([*SIGNAL_RUN, f"log.run_dir={run_dir}", "checkpoint.resume=auto"], ranks)
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-3000:]
    assert_same_run_state(checkpoint_state(straight), checkpoint_state(run_dir))


def test_a_repeated_sigterm_is_one_request_and_only_a_second_ctrl_c_ends_at_once(
        tmp_path, monkeypatch):
    """Schedulers repeat SIGTERM (every process of the step, srun, a time limit after a
    --signal warning): never an escalation, the scheduler's SIGKILL follows anyway. A second
    Ctrl-C after the first one's window ends the process without waiting for the step."""
    monkeypatch.setattr(preemption, "REPEAT_WINDOW_S", 0.05)
    request = StopRequest(tmp_path, True, torch.device("cpu"), distributed=False)
    request.begin()
    try:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # later than the window: still the same request
        assert request.poll() == preemption.TERMINATED
    finally:
        request.close()
    # as a user's Python has it (a suite started in a script's background ignores SIGINT)
    background = signal.signal(signal.SIGINT, signal.default_int_handler)
    request = StopRequest(tmp_path, True, torch.device("cpu"), distributed=False)
    request.begin()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # within the window: the same Ctrl-C
        assert request.poll() == preemption.TERMINATED
        time.sleep(0.2)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        request.close()
        signal.signal(signal.SIGINT, background)


def test_sigint_without_a_terminal_is_a_checkpointed_stop(tmp_path):
    """`kill -INT`, an IDE's stop button: no terminal (stdin is /dev/null), the same stop as
    Ctrl-C or SIGTERM, not Python's KeyboardInterrupt (exit 130, no checkpoint)."""
    run_dir = tmp_path / "run"
    process = _start([*SIGNAL_RUN, f"log.run_dir={run_dir}", "data.workers=0"])
    _wait_for_train_records(run_dir, 3, process)
    os.kill(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 75, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["terminated"] and not summary["finished"], summary
    assert newest_checkpoint(run_dir).name == f"step-{summary['steps']:08d}"


def test_a_stop_signal_during_a_quick_start_up_stops_after_the_first_step(tmp_path,
                                                                          monkeypatch):
    """A signal while the ranks start is a request (they agree on it after the first step);
    a start-up that reaches the first step within the grace stands the timer down (a timer
    that fired would end this very process)."""
    from conadv.train import parts as parts_module

    monkeypatch.setattr(preemption, "STARTUP_GRACE_S", 1.0)
    build = parts_module.build_model

    def signalled_while_building(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)

    monkeypatch.setattr(parts_module, "build_model", signalled_while_building)
    stopped = train(tiny_config(tmp_path / "run", "train.max_steps=4"))
    assert stopped["terminated"] and stopped["steps"] == 1, stopped
    assert newest_checkpoint(tmp_path / "run").name == "step-00000001"
    time.sleep(1.5)  # past the grace: still here


def test_a_start_up_that_cannot_reach_its_first_step_after_a_signal_ends_with_a_summary(
        tmp_path):
    """A stop signal during start-up waits for the first step (the ranks agree there); a
    start-up stuck on the way (a huge or slow file system) ends on its own after the grace,
    exit 75, with the summary a scheduler's script requeues on, and the requeued attempt
    resumes the run (the dead process's lock is taken over)."""
    run = tmp_path / "run"
    stuck = textwrap.dedent(f"""
        import os, signal, sys, time
        from conadv.cli.train import main
        from conadv.train import parts, preemption
        preemption.STARTUP_GRACE_S = 1.0
        def stuck_after_the_claim(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # as the scheduler sends it
            time.sleep(120)  # start-up that would not end by itself
        parts.build_model = stuck_after_the_claim
        main({[*TINY, f"log.run_dir={run}", "train.max_steps=4"]!r})
        """)
    started = time.monotonic()
    ended = subprocess.run([sys.executable, "-c", stuck], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=120)
    assert ended.returncode == 75, ended.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert "did not reach the first step within 1 s of the stop signal" in ended.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["terminated"] and summary["steps"] is None, summary
    assert summary["stop_reason"] == preemption.STARTUP_REASON
    resumed = train(tiny_config(run, "train.max_steps=4", "checkpoint.resume=auto"))
    assert resumed["finished"] and resumed["steps"] == 4  # as the requeued job would


def test_a_stop_signal_in_the_instant_a_worker_starts_does_not_kill_it(monkeypatch):
    """A job-wide SIGTERM can reach a DataLoader worker between its fork and its handler (the
    evaluation loader forks in the middle of training): the parent blocks the stop signals
    while it starts workers, so the worker holds it until it ignores it."""
    from conadv.config import DataConfig
    from conadv.data import loader as loader_module

    ignore = loader_module.ignore_stop_signals

    def signalled_while_starting(worker_id: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # what the scheduler sends to every process
        ignore(worker_id)

    monkeypatch.setattr(loader_module, "ignore_stop_signals", signalled_while_starting)
    loader = loader_module._loader(list(range(8)), range(8), 4, DataConfig(workers=2),
                                   pin=False, drop_last=False)
    assert [batch.tolist() for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_stop_file_stops_after_a_step_with_a_checkpoint_and_is_then_removed(tmp_path):
    run = ["train.max_steps=6", "checkpoint.every_steps=1000"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "STOP").touch()
    stopped = train(tiny_config(tmp_path / "run", *run))
    assert stopped["stop_reason"] and stopped["steps"] == 1 and not stopped["finished"]
    assert newest_checkpoint(tmp_path / "run").name == "step-00000001"
    assert not (tmp_path / "run" / "STOP").exists()  # the resumed run is not stopped again
    resumed = train(tiny_config(tmp_path / "run", *run, "checkpoint.resume=auto"))
    assert resumed["finished"] and resumed["steps"] == 6


@pytest.mark.slow
def test_workers_that_stopped_cleanly_are_not_restarted_by_torchrun(tmp_path):
    """SIGTERM to the workers only, as when the request reached the job through another
    node's agent: they agree, checkpoint and exit 75; torchrun with --max-restarts must not
    start them again (they would resume and train on through the preemption)."""
    cmd = [str(REPO / "launch/torchrun.sh"), "--nproc-per-node", "2", "--max-restarts", "2",
           "--", *SIGNAL_RUN, "train.max_steps=400", f"log.run_dir={tmp_path}"]
    agent = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(PYTHON=sys.executable),
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    _wait_for_train_records(tmp_path, 3, agent)
    ranks = children_of(agent.pid)
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)
    _, err = agent.communicate(timeout=180)
    assert agent.returncode == 75, err[-3000:]
    assert "will restart worker group" not in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["terminated"] and not summary["finished"] and summary["steps"] < 400


# ------------------------------------------------------------------ a failing rank


FAILING_RANK = """
import os, sys
from conadv.train.trainer import Trainer
original = Trainer.train_step
def train_step(self):
    if self.env.rank == 1 and self.step == 2:
        raise RuntimeError("simulated fault on rank 1")
    return original(self)
Trainer.train_step = train_step
from conadv.cli.train import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_failing_rank_is_named_with_its_error_by_torchrun(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
           f"--master-port={free_port()}", str(script), *TINY, "train.max_steps=6",
           "dist.timeout_s=30", f"log.run_dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), text=True,
                            capture_output=True, timeout=300)
    assert result.returncode != 0
    report = result.stderr
    assert "RuntimeError: simulated fault on rank 1" in report, report[-3000:]
    assert re.search(r"rank\s*:\s*1", report), report[-3000:]
    assert "error_file: <N/A>" not in report.split("Root Cause")[-1]


# ------------------------------------------------------------------ kill -9


@pytest.mark.slow
def test_kill_9_at_random_times_never_breaks_resume_or_the_result(tmp_path):
    """Four SIGKILLs at random moments of a run that writes a checkpoint every step (so most
    land during a write); every restart resumes, and the end equals an uninterrupted run."""
    import random

    run = [*TINY, "train.max_steps=24", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
           "log.every_steps=1"]
    straight = _start([*run, f"log.run_dir={tmp_path / 'straight'}"])
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-3000:]

    run_dir = tmp_path / "killed"
    chooser = random.Random(1234)
    kills = 0
    while kills < 4:
        records = _train_record_count(run_dir)
        process = _start([*run, f"log.run_dir={run_dir}", "checkpoint.resume=auto"])
        deadline = time.time() + 120
        while _train_record_count(run_dir) <= records and process.poll() is None:
            assert time.time() < deadline, "the restarted run made no progress"
            time.sleep(0.02)
        if process.poll() is not None:  # it ended before we could kill it: finished, or not?
            _, err = process.communicate()
            assert process.returncode == 0, f"a restart crashed:\n{err[-3000:]}"
            assert json.loads((run_dir / "summary.json").read_text())["finished"]
            break
        time.sleep(chooser.uniform(0.0, 0.15))
        process.kill()
        process.communicate(timeout=60)
        kills += 1
    assert kills >= 3
    final = _start([*run, f"log.run_dir={run_dir}", "checkpoint.resume=auto"])
    assert final.wait(timeout=300) == 0, final.communicate()[1][-3000:]
    assert_same_run_state(checkpoint_state(tmp_path / "straight"), checkpoint_state(run_dir))
    assert checkpoint_state(run_dir)["step"] == 24
    assert not list((run_dir / "checkpoints").glob("*.partial"))
