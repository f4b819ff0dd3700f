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
    ExpectedView,
    Heartbeat,
    HeartbeatWatch,
    TrainersFailed,
    ViewMismatch,
    attacker_of,
    check_header,
    label_checksum,
    served_by,
    view_header,
)
from conadv.config import load_config, trainer_count
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


def _train(nproc: int, run_dir: Path, *extra: str):
    result = run_torchrun(nproc, *LAYOUT, f"log.run_dir={run_dir}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
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


def test_the_label_checksum_sees_order_and_values_but_not_dtype_or_reduction_order():
    labels = torch.randint(0, 1000, (4096,))
    checksum = int(label_checksum(labels))
    assert int(label_checksum(labels.to(torch.int32))) == checksum  # DALI's labels are int32
    assert int(label_checksum(labels.flip(0))) != checksum
    changed = labels.clone()
    changed[1234] = (changed[1234] + 1) % 1000
    assert int(label_checksum(changed)) != checksum
    # soft labels (mixup): quantised, so equal floats give equal numbers however summed
    soft = torch.softmax(torch.randn(64, 1000), dim=1)
    assert int(label_checksum(soft)) == int(label_checksum(soft.clone()))
    assert int(label_checksum(soft)) != int(label_checksum(soft.roll(1, dims=0)))


def test_a_view_header_must_match_the_batch_the_trainer_trains():
    labels = torch.tensor([3, 1, 4, 1, 5])
    header = view_header(17, labels)
    check_header(header, ExpectedView.of(17, labels), source=2, step=5)  # the same batch
    with pytest.raises(ViewMismatch, match="attack rank 2 sent the views of batch key 18"):
        check_header(view_header(18, labels), ExpectedView.of(17, labels), source=2, step=5)
    with pytest.raises(ViewMismatch, match="reads other data than this trainer"):
        check_header(view_header(17, labels.flip(0)), ExpectedView.of(17, labels), 2, 5)


def test_the_attack_ranks_watch_trainer_0s_heartbeat_in_the_store():
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True,
                          wait_for_workers=False, timeout=timedelta(seconds=10))
    beat = Heartbeat(store, period_s=0.05)
    watch = HeartbeatWatch(store, timeout_s=0.5, period_s=0.05)
    until = time.monotonic() + 1.5  # three timeouts: a beating trainer 0 is never given up
    while time.monotonic() < until:
        watch.check()
        time.sleep(0.01)
    beat.stop()  # trainer 0 freezes: within the timeout (and a period) the watch says so
    stopped = time.monotonic()
    with pytest.raises(TrainersFailed, match=r"trainer 0 has not been heard from for \d+ s"):
        while time.monotonic() < stopped + 5:
            watch.check()
            time.sleep(0.01)
    assert time.monotonic() - stopped < 1.5


@pytest.mark.slow
def test_attack_ranks_train_bit_for_bit_what_the_trainers_would_with_tau_1(tmp_path):
    _train(2, tmp_path / "inline", "adv.tau=1")
    remote = _train(3, tmp_path / "remote", "adv.tau=1", "adv.attack_ranks=1")
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
    _train(2, tmp_path / "inline", "adv.tau=2")
    run_dir = tmp_path / "remote"
    _train(3, run_dir, "adv.tau=2", "adv.attack_ranks=1", "train.stop_at_step=3")
    resumed = _train(3, run_dir, "adv.tau=2", "adv.attack_ranks=1", "checkpoint.resume=auto")
    assert "resumed from" in resumed.stderr and "step-00000003" in resumed.stderr
    assert_same_run_state(checkpoint_state(run_dir), checkpoint_state(tmp_path / "inline"))


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
    named = re.search(r"attack rank (\(rank 2\)|2 )[^\n]*the job ends", output)
    assert named or "stopping after step" in output, output[-3000:]
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
     r"trainer 0 (did not take its adversarial views within dist.timeout_s=20 s|has not been "
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
