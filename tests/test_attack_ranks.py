"""Attack ranks (adv.attack_ranks): the attack on ranks of its own, through a real torchrun
rendezvous (gloo on CPU). The reference is the same two trainers with the attack inline: an
attack is a pure function of (weights of its source step, batch key), so the runs must agree
bit for bit, checkpoint and all."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conadv.adversarial.attack_ranks import (
    GO,
    AttackLink,
    AttackOrders,
    AttackRankLost,
    Heartbeat,
    HeartbeatWatch,
    Incoming,
    TrainersFailed,
    ViewMismatch,
    checksum,
    view_header,
)
from conadv.config import load_config, trainer_count
from conadv.distributed import DistEnv, JobGroups, attacker_of, served_by
from conadv.errors import ConfigError
from tests.helpers import (
    REPO,
    TINY,
    assert_same_run_state,
    checkpoint_state,
    children_of,
    free_port,
    run_module,
    run_torchrun,
    subprocess_env,
    the_error_line,
)

# 2 trainers x 8 images x accumulation 2; the attack ranks serve whole trainers
LAYOUT = [*TINY, "train.global_batch=32", "train.accumulation=2", "train.max_steps=6",
          "train.deterministic=false", "optim.weight_decay=1e-3", "data.min_crop_scale=0.5",
          "checkpoint.every_steps=100", "adv.enabled=true"]


def _train(nproc: int, run_dir: Path, *extra: str, checked: bool = False):
    """`checked`: every rank under the stream-order checker, the trainers on the stream
    executor (what adv.executor=auto picks on a GPU), their receives on streams of their own."""
    if checked:
        extra = (*extra, "adv.executor=stream")
    result = run_torchrun(nproc, *LAYOUT, f"log.run_dir={run_dir}", *extra,
                          module="tests.checked_train" if checked else "conadv.cli.train")
    assert result.returncode == 0, result.stderr[-3000:]
    if checked:
        assert result.stderr.count("stream order checked: no violation") == nproc
    return result


def test_the_last_ranks_attack_and_each_serves_whole_trainers():
    adv = load_config(None, ["adv.enabled=true", "adv.attack_ranks=3"]).adv
    assert trainer_count(adv, 11) == 8
    assert [attacker_of(r, 8, 3) for r in range(8)] == [8, 9, 10, 8, 9, 10, 8, 9]
    assert served_by(8, 8, 3) == [0, 3, 6] and served_by(10, 8, 3) == [2, 5]
    with pytest.raises(ConfigError, match="leaves no trainer"):
        trainer_count(adv, 3)
    with pytest.raises(ConfigError, match="more than the 2 trainers"):
        trainer_count(adv, 5)


@pytest.mark.parametrize("overrides, message", [
    (["adv.enabled=true", "adv.tau=0", "adv.attack_ranks=1"], "needs ConAdv with adv.tau >= 1"),
    (["adv.enabled=false", "adv.attack_ranks=1"], "needs ConAdv with adv.tau >= 1"),
])
def test_attack_ranks_without_staleness_are_refused_in_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_dry_run_prints_which_ranks_attack():
    result = run_module("conadv.cli.train", "--dry-run", "train.global_batch=96",
                        "adv.enabled=true", "adv.attack_ranks=4", WORLD_SIZE="16")
    assert result.returncode == 0, result.stderr
    assert "96 = 8 per device x 12 ranks x 1 accumulation" in result.stdout
    assert "ranks 0-11 train; ranks 12-15 attack (each serves 3 trainers" in result.stdout


def test_the_checksum_sees_order_and_values_but_not_the_dtype():
    labels = torch.randint(0, 1000, (4096,))
    assert checksum(labels.to(torch.int32)) == checksum(labels)
    assert checksum(labels.flip(0)) != checksum(labels)
    changed = labels.clone()
    changed[1234] = (changed[1234] + 1) % 1000
    assert checksum(changed) != checksum(labels)


def _batch(index: list[int], label: list[int]) -> dict[str, torch.Tensor]:
    return {"image": torch.zeros(len(index), 1, 2, 2), "index": torch.tensor(index),
            "label": torch.tensor(label)}


class _Work:
    """A posted receive that has arrived, or one that times out; records its waits' timeouts."""

    def __init__(self, arrives: bool = True) -> None:
        self.arrives, self.timeouts = arrives, []

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        if not self.arrives:
            raise RuntimeError("Timed out waiting 1000ms for recv operation to complete")
        return True


def _link(timeout_s: int = 100) -> AttackLink:
    # trainer 1 of 2, served by attack rank 2 (a trainer other than 0 keeps no heartbeat)
    env = DistEnv("torchrun", 1, 3, 1, "127.0.0.1", 1)
    groups = JobGroups(trainers=None, weights=None, headers=None, store=None)
    return AttackLink(load_config(None, []).adv, groups, env, 2, timeout_s, torch.device("cpu"))


def _incoming(sent: dict, trained: dict, posted_ago_s: float = 0.0, arrives: bool = True):
    return Incoming(torch.zeros(2, 1, 2, 2), _Work(arrives), view_header(7, sent), _Work(),
                    view_header(7, trained), source=2, step=5,
                    posted_at=time.perf_counter() - posted_ago_s)


def test_a_trainer_refuses_views_of_another_micro_batch_in_one_sentence():
    link, batch = _link(), _batch([4, 9], [3, 1])
    link.consume(_incoming(batch, batch))  # the same micro-batch
    # an unreadable image skipped on the attack rank only: sample 10 served instead of 9,
    # usually with the same label (an image folder is sorted by class)
    with pytest.raises(ViewMismatch, match=r"attack rank 2 sent the views of batch key 7 "
                                           r"\(index and label checksums"):
        link.consume(_incoming(_batch([4, 10], [3, 1]), batch))
    with pytest.raises(ViewMismatch, match="reads other data than this trainer"):
        link.consume(_incoming(_batch([4, 9], [1, 3]), batch))
    other_key = _incoming(batch, batch)
    other_key.header[0] = 8
    with pytest.raises(ViewMismatch, match="batch key 8"):
        link.consume(other_key)


def test_a_trainer_waits_for_a_view_until_a_deadline_counted_from_its_receive():
    link, batch = _link(timeout_s=100), _batch([0, 1], [0, 1])
    fresh, old = _incoming(batch, batch), _incoming(batch, batch, posted_ago_s=60)
    link.consume(fresh)
    link.consume(old)
    # 0.9 x 100 s from the post: all of it for a fresh receive, 30 s for one posted 60 s ago
    assert fresh.work.timeouts[0].total_seconds() == pytest.approx(90, abs=1)
    assert old.header_work.timeouts[0].total_seconds() == pytest.approx(30, abs=1)
    with pytest.raises(AttackRankLost, match="attack rank 2 did not send the adversarial images "
                                             "made at step 5 within 0.9 x dist.timeout_s=100"):
        link.consume(_incoming(batch, batch, arrives=False))


def test_an_attack_rank_refuses_weights_of_another_model_in_one_sentence(monkeypatch):
    class Done:
        def is_completed(self):
            return True

        def wait(self, timeout=None):
            return True

    def broadcast(tensor, src, group, async_op=False):
        tensor.copy_(torch.tensor([GO, 3, 4, 4, 999]))  # trainer 0's word: 999 weights
        return Done()

    monkeypatch.setattr(dist, "broadcast", broadcast)
    groups = JobGroups(trainers=None, weights=None, headers=None, store=None)
    orders = AttackOrders(load_config(None, []).adv, groups, [torch.zeros(10)], 100,
                          torch.device("cpu"))
    with pytest.raises(ConfigError, match="trainer 0 sends 999 weights but this attack "
                                          "rank's model has 10"):
        orders.next()


def test_the_attack_ranks_watch_trainer_0s_heartbeat_in_the_store():
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=10))
    beat = Heartbeat(store, period_s=0.1)
    watch = HeartbeatWatch(store, timeout_s=2.0, period_s=0.1)
    until = time.monotonic() + 3.0  # longer than the timeout: a beating trainer 0 stays
    while time.monotonic() < until:
        watch.check()
        time.sleep(0.01)
    beat.stop()  # trainer 0 freezes: within the timeout (and a period or two) the watch says so
    stopped = time.monotonic()
    with pytest.raises(TrainersFailed, match=r"trainer 0 has not been heard from for \d+ s"):
        while time.monotonic() < stopped + 10:
            watch.check()
            time.sleep(0.01)
    assert 1.8 < time.monotonic() - stopped < 4.0


def test_a_store_that_does_not_answer_counts_as_no_heartbeat():
    class GoneStore:
        def add(self, key, value):
            raise RuntimeError("Connection reset by peer")

    watch = HeartbeatWatch(GoneStore(), timeout_s=0.3, period_s=0.05)
    watch.check()  # one failed read is not yet a verdict
    time.sleep(0.4)
    with pytest.raises(TrainersFailed, match="the job's store does not answer: Connection reset"):
        watch.check()


@pytest.mark.slow
def test_attack_ranks_train_bit_for_bit_what_the_trainers_would_with_tau_1(tmp_path):
    _train(2, tmp_path / "inline", "adv.tau=1")
    remote = _train(3, tmp_path / "remote", "adv.tau=1", "adv.attack_ranks=1", checked=True)
    assert "8 per device x 2 ranks x 2 accumulation" in remote.stderr
    assert_same_run_state(checkpoint_state(tmp_path / "remote"),
                          checkpoint_state(tmp_path / "inline"))
    # bf16 weights: attacks from rounded weights, so the run must differ (the views really
    # come from the attack rank)
    _train(3, tmp_path / "bf16", "adv.tau=1", "adv.attack_ranks=1", "adv.attack_weights=bf16")
    with pytest.raises(AssertionError):
        assert_same_run_state(checkpoint_state(tmp_path / "bf16"),
                              checkpoint_state(tmp_path / "inline"))


@pytest.mark.slow
def test_attack_ranks_with_tau_2_stop_and_resume_on_the_same_trajectory(tmp_path):
    """Stopped inside the first tau steps, on the stream executor under the checker."""
    _train(2, tmp_path / "inline", "adv.tau=2")
    run_dir = tmp_path / "remote"
    _train(3, run_dir, "adv.tau=2", "adv.attack_ranks=1", "train.stop_at_step=1", checked=True)
    resumed = _train(3, run_dir, "adv.tau=2", "adv.attack_ranks=1", "checkpoint.resume=auto",
                     checked=True)
    assert "resumed from" in resumed.stderr and "step-00000001" in resumed.stderr
    assert_same_run_state(checkpoint_state(run_dir), checkpoint_state(tmp_path / "inline"))


@pytest.mark.slow
def test_attack_ranks_with_tau_3_hold_their_views_until_the_trainers_ask(tmp_path):
    """Views made three steps ahead wait on the attack rank and go out one step before they
    are trained, when the trainers post their receives: sending them at once would leave
    them unmatched across the weights broadcasts the trainers wait for in between."""
    _train(2, tmp_path / "inline", "adv.tau=3")
    _train(3, tmp_path / "remote", "adv.tau=3", "adv.attack_ranks=1", checked=True)
    assert_same_run_state(checkpoint_state(tmp_path / "remote"),
                          checkpoint_state(tmp_path / "inline"))


def _rank_pid(launcher: int, rank: int) -> int | None:
    for agent in children_of(launcher):
        for pid in [agent, *children_of(agent)]:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"conadv.cli.train" in command:
                return pid
    return None


@pytest.mark.slow
def test_a_killed_attack_rank_ends_the_job_in_one_sentence_and_the_restart_resumes(tmp_path):
    steps = ["train.max_steps=16", "checkpoint.every_steps=1", "checkpoint.resume=auto",
             "adv.tau=1"]
    _train(2, tmp_path / "inline", *steps)
    run_dir = tmp_path / "remote"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3",
               "--nnodes=1", f"--master-port={free_port()}", "--max-restarts=1",
               "-m", "conadv.cli.train", *LAYOUT, f"log.run_dir={run_dir}", *steps,
               "adv.attack_ranks=1"]
    job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
            assert time.monotonic() < deadline and job.poll() is None, "the run did not start"
            time.sleep(0.05)
        os.kill(_rank_pid(job.pid, 2), signal.SIGKILL)
        output, _ = job.communicate(timeout=240)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    # the trainers either notice the dead attack rank first (one sentence naming it, logged
    # at once) or torchrun's SIGTERM to the group first (a stop with a checkpoint); either way
    # the restarted group resumes on the same trajectory
    # (whichever of its collectives notices: a view not sent, the weights or the stop word
    # not taken; each is one AttackRankLost sentence)
    named = re.search(r"attack rank[^\n]*; the job ends and resumes", output)
    first_attempt = output.split("resumed from")[0]
    assert named or "stopping after step" in output, first_attempt[-4000:]
    assert "resumed from" in output
    assert_same_run_state(checkpoint_state(run_dir), checkpoint_state(tmp_path / "inline"))


def test_a_single_process_with_attack_ranks_is_refused_in_one_sentence(tmp_path):
    result = run_module("conadv.cli.train", *LAYOUT, "adv.attack_ranks=1",
                        f"log.run_dir={tmp_path}")
    assert "adv.attack_ranks=1 leaves no trainer in a world of 1" in the_error_line(result)


@pytest.mark.slow
def test_a_trainer_error_before_the_first_step_ends_the_attack_ranks_too(tmp_path):
    run_dir = tmp_path / "run"
    _train(2, run_dir, "adv.tau=1", "train.max_steps=1")
    # the run directory holds that run: every trainer refuses to start; the attack rank must
    # leave with them instead of waiting for a step that never comes
    started = time.monotonic()
    refused = run_torchrun(3, *LAYOUT, f"log.run_dir={run_dir}", "adv.tau=1",
                           "adv.attack_ranks=1", timeout=120)
    assert refused.returncode != 0 and time.monotonic() - started < 120
    assert "holds another run" in refused.stderr
    assert "the trainers ended with an error" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("when, steps, sentence", [
    # mid-training: the attack rank's sends to trainer 0 time out, or, if it had sent all it
    # was asked for, the heartbeat stops (which comes first depends on the moment)
    ("training", ["train.max_steps=100000"],
     r"trainer 0 (did not take its adversarial views within 0.9 x dist.timeout_s=20 s|has not been "
     r"heard from for \d+ s \(dist.timeout_s=20\))"),
    # between steps (a long final evaluation under PGD), nothing in flight: only trainer 0's
    # heartbeat can tell the attack rank, whose wait for the next step has no deadline
    ("evaluating", ["train.max_steps=3", "eval.robust=true", "eval.pgd_steps=5000"],
     r"trainer 0 has not been heard from for \d+ s \(dist.timeout_s=20\)"),
], ids=["training", "evaluating"])
def test_an_attack_rank_leaves_in_one_sentence_when_trainer_0_freezes(tmp_path, when, steps,
                                                                      sentence):
    # SIGSTOP: trainer 0's sockets stay open (as when its node drops off the network), so no
    # connection fails; only deadlines and the heartbeat can end the attack rank
    run_dir, log_path = tmp_path / "run", tmp_path / "job.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--nnodes=1", f"--master-port={free_port()}", "-m", "conadv.cli.train",
               *LAYOUT, f"log.run_dir={run_dir}", *steps, "adv.tau=1", "adv.attack_ranks=1",
               "dist.timeout_s=20"]
    with log_path.open("w") as log:
        job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), text=True,
                               stdout=log, stderr=subprocess.STDOUT)
    trainer = None
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
            assert time.monotonic() < deadline and job.poll() is None, log_path.read_text()
            time.sleep(0.02)
        trainer = _rank_pid(job.pid, 0)
        os.kill(trainer, signal.SIGSTOP)
        frozen = time.monotonic()
        while not re.search(sentence, log_path.read_text()):
            assert time.monotonic() < frozen + 60, log_path.read_text()[-3000:]
            time.sleep(0.1)
        noticed = time.monotonic() - frozen
    finally:
        if trainer is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(trainer, signal.SIGKILL)
        job.kill()
        job.wait()
    # dist.timeout_s (and a heartbeat period of 2 s), with slack for a loaded machine
    assert 15 <= noticed < 30, (when, noticed)
    errors = [line for line in log_path.read_text().splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(sentence, errors[0]), errors


def _team_member(rank: int, port: int, queue) -> None:
    """One rank of a 3 trainer + 2 attack rank job: the groups as the job makes them, then a
    header from each attack rank to each trainer it serves and one weights broadcast."""
    from conadv.distributed import process_group

    env = DistEnv("torchrun", rank, 5, rank, "127.0.0.1", port)
    with process_group(env, torch.device("cpu"), "gloo", 30, trainers=3) as groups:
        if rank >= 3:
            for trainer in served_by(rank, 3, 2):
                dist.send(torch.tensor([rank, trainer, 0]), dst=trainer, group=groups.headers)
            got = None
        else:
            got = torch.empty(3, dtype=torch.int64)
            dist.recv(got, src=attacker_of(rank, 3, 2), group=groups.headers)
            got = got.tolist()
        weights = torch.tensor([float(rank == 0)])
        if rank == 0 or rank >= 3:
            dist.broadcast(weights, src=0, group=groups.weights)
        queue.put((rank, got, float(weights), dist.get_world_size(groups.headers)))


def test_each_attack_rank_and_its_trainers_share_a_small_header_group():
    # teams [0, 2, 3] and [1, 4]: each rank makes only its own team's gloo group, so no rank
    # opens a connection to every other; the views' headers reach the right trainers
    import torch.multiprocessing as mp

    ctx, port = mp.get_context("spawn"), free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_team_member, args=(r, port, queue)) for r in range(5)]
    for proc in procs:
        proc.start()
    results = {rank: (got, weight, team) for rank, got, weight, team in
               (queue.get(timeout=120) for _ in procs)}
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert {r: got for r, (got, _, _) in results.items()} == {
        0: [3, 0, 0], 1: [4, 1, 0], 2: [3, 2, 0], 3: None, 4: None}
    assert {r: team for r, (_, _, team) in results.items()} == {0: 3, 1: 2, 2: 3, 3: 3, 4: 2}
    assert [results[r][1] for r in (0, 3, 4)] == [1.0, 1.0, 1.0]


class _NeverDone:
    """Collective work whose peer never comes (a frozen process or a vanished node)."""

    def __init__(self) -> None:
        self.timeouts = []

    def is_completed(self):
        return False

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        raise RuntimeError("Timed out waiting for the broadcast to complete")


def test_trainer_0s_stop_word_has_a_deadline(monkeypatch):
    """The weights group waits up to 7 days (it spans evaluations): the final broadcast gets
    0.9 x dist.timeout_s and one sentence, not the group's timeout."""
    never = _NeverDone()
    monkeypatch.setattr(dist, "broadcast", lambda *args, **kwargs: never)
    env = DistEnv("torchrun", 0, 2, 0, "127.0.0.1", 1)

    class Store:
        def add(self, key, value):
            return 0

    groups = JobGroups(trainers=None, weights=None, headers=None, store=Store())
    link = AttackLink(load_config(None, []).adv, groups, env, 1, 100, torch.device("cpu"))
    with pytest.raises(AttackRankLost, match="an attack rank did not take the stop word"):
        link.stop(failed=False)
    assert never.timeouts[0].total_seconds() == pytest.approx(90, abs=1)


def test_an_attack_rank_waiting_for_the_weights_watches_trainer_0s_heartbeat(monkeypatch):
    """Trainer 0 froze between the control word and the weights: the attack rank notices by
    the heartbeat (its own deadline, 0.9 x dist.timeout_s, is far off) instead of waiting on
    the 7-day weights group."""
    class Done:
        def is_completed(self):
            return True

        def wait(self, timeout=None):
            return True

    calls = []

    def broadcast(tensor, src, group, async_op=False):
        calls.append(tensor)
        if len(calls) == 1:  # the control word arrives
            tensor.copy_(torch.tensor([GO, 3, 4, 4, 10]))
            return Done()
        return _NeverDone()  # the weights never do

    class SilentStore:
        def add(self, key, value):
            return 7  # trainer 0's pulse stopped moving

    monkeypatch.setattr(dist, "broadcast", broadcast)
    groups = JobGroups(trainers=None, weights=None, headers=None, store=SilentStore())
    orders = AttackOrders(load_config(None, []).adv, groups, [torch.zeros(10)], 3600,
                          torch.device("cpu"))
    orders._trainer0 = HeartbeatWatch(SilentStore(), timeout_s=0.5, period_s=0.05)
    started = time.monotonic()
    with pytest.raises(TrainersFailed, match=r"trainer 0 has not been heard from for \d+ s"):
        orders.next()
    # the heartbeat's timeout and a period, with slack for a loaded machine; not the hour
    assert len(calls) == 2 and time.monotonic() - started < 10
