"""Failures that must not lose work: non-finite training, failed checkpoint writes, termination
signals, and a failing rank under torchrun."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conadv.adversarial.engine import ViewEngine
from conadv.distributed import DistEnv
from conadv.errors import CheckpointWriteError, TrainingDiverged
from conadv.train import checkpoint as checkpoint_module
from conadv.train.nonfinite import first_non_finite
from conadv.train.trainer import Trainer, train
from tests.helpers import (
    REPO,
    TINY,
    checkpoint_state,
    free_port,
    newest_checkpoint,
    run_module,
    subprocess_env,
    the_error_line,
    tiny_config,
)

SINGLE = DistEnv("single", 0, 1, 0, "127.0.0.1", 0)


def _poison_loss_at(monkeypatch, calls: set[int]) -> None:
    """Make the training loss NaN at the given (0-based) micro-step calls."""
    original = ViewEngine.loss
    counter = {"n": 0}

    def loss(self, criterion, logits, inputs):
        value, stats = original(self, criterion, logits, inputs)
        if counter["n"] in calls:
            value = value * float("nan")
        counter["n"] += 1
        return value, stats

    monkeypatch.setattr(ViewEngine, "loss", loss)


def _optimizer_tensors(trainer) -> dict:
    state = {f"param.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    for i, s in enumerate(trainer.optimizer.state.values()):
        for k, v in s.items():
            state[f"state.{i}.{k}"] = v.detach().clone()
    return state


# ------------------------------------------------------------------ non-finite training


@pytest.mark.slow
def test_a_diverging_demo_run_stops_within_a_logging_window_and_resumes(tmp_path):
    """A good start, then the demo config with optim.lr=1e6 (a NaN late in a run), then a
    resume with the sane config from the newest finite checkpoint."""
    run = [f"--config={REPO / 'configs/demo.yaml'}", f"log.run_dir={tmp_path}",
           "checkpoint.every_steps=20", "log.progress=false", "log.tensorboard=false",
           "train.max_steps=30", "adv.eval_robust=false", "train.eval_every_epochs=0"]
    good = run_module("conadv.cli.train", *run, "train.stop_at_step=10")
    assert good.returncode == 0, good.stderr[-2000:]

    diverged = run_module("conadv.cli.train", *run, "optim.lr=1e6", "checkpoint.resume=auto",
                          "checkpoint.allow_config_change=true")
    error = the_error_line(diverged)
    match = re.search(r"non-finite (?:at|between) steps? (\d+)(?: and (\d+))?", error)
    assert match, error
    last_bad = int(match.group(2) or match.group(1))
    assert last_bad <= 20  # the demo logs every 20 steps: stopped within the first window
    newest = newest_checkpoint(tmp_path)
    assert newest.name == "step-00000010" and str(newest) in error
    assert first_non_finite(checkpoint_state(tmp_path)) is None

    resumed = run_module("conadv.cli.train", *run, "checkpoint.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from"] == str(newest) and summary["finished"]
    assert first_non_finite(checkpoint_state(tmp_path)) is None


def test_stop_policy_names_the_step_and_the_newest_finite_checkpoint(tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, {2})
    with pytest.raises(TrainingDiverged, match="at step 3") as caught:
        train(tiny_config(tmp_path, "train.max_steps=6", "checkpoint.every_steps=1",
                          "log.every_steps=10"))
    assert str(tmp_path / "checkpoints" / "step-00000002") in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000001", "step-00000002"]  # no checkpoint of the poisoned weights


@pytest.mark.parametrize("adv", [[], ["adv.enabled=true"]], ids=["vanilla", "conadv"])
def test_skip_policy_undoes_a_poisoned_step_on_the_device(tmp_path, monkeypatch, adv):
    _poison_loss_at(monkeypatch, {2})
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


def test_skip_policy_finishes_and_reports_the_skipped_step(tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, {2})
    summary = train(tiny_config(tmp_path, "train.on_nonfinite=skip", "train.max_steps=5",
                                "checkpoint.every_steps=1"))
    assert summary["finished"] and summary["skipped_steps"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if r["kind"] == "train"] == [0, 0, 1, 1, 1]
    assert first_non_finite(checkpoint_state(tmp_path)) is None


def test_skip_policy_stops_after_too_many_skipped_steps_in_a_row(tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, {1, 2, 3})
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row were skipped"):
        train(tiny_config(tmp_path, "train.on_nonfinite=skip", "train.max_skipped_steps=2",
                          "train.max_steps=6"))


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

SIGNAL_RUN = [*TINY, "train.max_steps=40", "checkpoint.every_steps=1000", "log.every_steps=1"]


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
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}",
               "--nnodes=1", f"--master-port={free_port()}", "-m", "conadv.cli.train", *args]
    else:
        cmd = [sys.executable, "-m", "conadv.cli.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [0, 2], ids=["single", "torchrun2"])
def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_bit_identical(tmp_path, ranks):
    straight = _start([*SIGNAL_RUN, f"log.run_dir={tmp_path / 'straight'}"], ranks)
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-3000:]

    run_dir = tmp_path / "split"
    process = _start([*SIGNAL_RUN, f"log.run_dir={run_dir}"], ranks)
    _wait_for_train_records(run_dir, 5, process)
    process.send_signal(signal.SIGTERM)  # torchrun's agent passes it on to its workers
    _, err = process.communicate(timeout=120)
    if not ranks:
        assert process.returncode == 75, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["terminated"] and not summary["finished"], summary
    stopped_at = summary["steps"]
    assert 5 <= stopped_at < 40
    assert newest_checkpoint(run_dir).name == f"step-{stopped_at:08d}"

    resumed = _start([*SIGNAL_RUN, f"log.run_dir={run_dir}", "checkpoint.resume=auto"], ranks)
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-3000:]
    a, b = checkpoint_state(tmp_path / "straight"), checkpoint_state(run_dir)
    assert a["step"] == b["step"] == 40
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
def test_a_second_sigterm_ends_the_process_at_once(tmp_path):
    slow_steps = ["train.global_batch=512", "model.cifar_width=32"]  # ~1 s per step here
    process = _start([*SIGNAL_RUN, *slow_steps, f"log.run_dir={tmp_path}"])
    _wait_for_train_records(tmp_path, 1, process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # two signals before the handler runs would count as one
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGTERM
    assert not (tmp_path / "checkpoints").exists()  # it did not wait for the step boundary


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
    """Ten SIGKILLs at random moments of a run that writes a checkpoint every step (so most
    land during a write); every restart resumes, and the end equals an uninterrupted run."""
    import random

    run = [*TINY, "train.max_steps=40", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
           "log.every_steps=1"]
    straight = _start([*run, f"log.run_dir={tmp_path / 'straight'}"])
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-3000:]

    run_dir = tmp_path / "killed"
    chooser = random.Random(1234)
    kills = 0
    while kills < 10:
        records = (run_dir / "metrics.jsonl").read_text().count('"kind": "train"') if (
            run_dir / "metrics.jsonl").exists() else 0
        process = _start([*run, f"log.run_dir={run_dir}", "checkpoint.resume=auto"])
        try:
            _wait_for_train_records(run_dir, records + 1, process)
        except AssertionError:
            break  # it finished before we could kill it
        time.sleep(chooser.uniform(0.0, 0.15))
        process.kill()
        process.communicate(timeout=60)
        kills += 1
    assert kills >= 8
    final = _start([*run, f"log.run_dir={run_dir}", "checkpoint.resume=auto"])
    assert final.wait(timeout=300) == 0, final.communicate()[1][-3000:]
    a, b = checkpoint_state(tmp_path / "straight"), checkpoint_state(run_dir)
    assert a["step"] == b["step"] == 40
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    assert not list((run_dir / "checkpoints").glob("*.partial"))
