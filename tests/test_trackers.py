"""Experiment trackers read back: one tracked run across a stop and a resume from an older
checkpoint, every step's metrics exactly once, the config as parameters, artifacts at the end;
a tracker that is down costs one warning."""

import glob
import json
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

import conadv.trackers
from conadv.trackers import STATE_FILE, Trackers
from conadv.train.job import train
from tests.helpers import REPO, subprocess_env, tiny_config

RUN = ["train.max_steps=6", "checkpoint.every_steps=2", "train.eval_every_epochs=0"]


def _stop_at_five_then_resume_from_four(run_dir, *tracker):
    """Steps 1-5 sent, then the run resumes from step 4 (step 5's checkpoint lost): step 5 is
    trained again and must not be sent twice."""
    train(tiny_config(run_dir, *RUN, *tracker, "train.stop_at_step=5"))
    shutil.rmtree(run_dir / "checkpoints" / "step-00000005")
    return train(tiny_config(run_dir, *RUN, *tracker, "checkpoint.resume=auto"))


def test_mlflow_keeps_one_run_with_every_step_once(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    summary = _stop_at_five_then_resume_from_four(tmp_path / "run", f"log.mlflow={store}")
    assert summary["resumed_from"].endswith("step-00000004") and summary["finished"]
    client = mlflow.tracking.MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("conadv")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed job continued the tracked run
    run = runs[0]
    assert run.info.run_id == json.loads((tmp_path / "run" / "trackers.json").read_text())[
        "mlflow"]["run_id"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert run.data.params["adv.enabled"] == "False" and run.data.params["train.max_steps"] == "6"
    assert run.info.status == "FINISHED"
    final = client.get_metric_history(run.info.run_id, "eval/top1")
    assert [m.value for m in final] == [summary["final_eval"]["top1"]]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.yaml", "report"} <= artifacts
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run.info.run_id, "report"))


def _wandb_history(path) -> list[int]:
    """The steps of the history records in an offline run file (W&B's record log: 32 KiB
    blocks of records with a 7-byte header each, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    raw, position, pending, steps = open(path, "rb").read(), 7, b"", []
    while position + 7 <= len(raw):
        if 32768 - position % 32768 < 7:
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if kind == 0:
            break
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json
                         for i in record.history.item}
                if "train/loss" in items:
                    steps.append(record.history.step.num)
    return steps


def test_wandb_offline_keeps_one_run_with_every_step_once(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _stop_at_five_then_resume_from_four(tmp_path / "run", "log.wandb=conadv-test")
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"]["run_id"]
    files = sorted(glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    steps = [step for path in files for step in _wandb_history(path)]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def test_a_tracker_that_is_down_costs_one_warning(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    summary = train(tiny_config(tmp_path, "train.max_steps=2",
                                "log.mlflow=http://127.0.0.1:9"))  # nothing listens there
    assert summary["finished"]
    warnings = [r for r in caplog.records if "mlflow tracker" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


# ----------------------------------------------------------------- what counts as sent (MLflow)


def _mlflow_history(store, run_dir) -> list[int]:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"]
    history = MlflowClient(tracking_uri=store.resolve().as_uri()).get_metric_history(
        run_id, "train/loss")
    return sorted(m.step for m in history)


def _store_metrics_through(monkeypatch, hold: Callable[[], None]) -> None:
    """MLflow's file store calls `hold` before it stores a metric batch (a slow, down or
    unreachable tracker server)."""
    from mlflow.store.tracking.file_store import FileStore

    store = FileStore.log_batch

    def held(self, run_id, metrics, params, tags):
        if metrics:
            hold()
        return store(self, run_id, metrics, params, tags)

    monkeypatch.setattr(FileStore, "log_batch", held)


KILLED_WHILE_QUEUED = """
import os, signal, sys, time
from pathlib import Path
from mlflow.store.tracking.file_store import FileStore
from conadv.trackers import Trackers

store = FileStore.log_batch
FileStore.log_batch = lambda self, run_id, metrics, params, tags: (
    time.sleep(3600) if metrics else store(self, run_id, metrics, params, tags))
trackers = Trackers(Path(sys.argv[1]), True, sys.argv[2], "", "run", {})
for step in (1, 2, 3):
    trackers.log("train", step, {"loss": 1.0 / step})
os.kill(os.getpid(), signal.SIGKILL)  # the node is lost with the three records still queued
"""


def test_mlflow_steps_a_killed_job_had_only_queued_are_sent_by_the_resumed_one(tmp_path):
    pytest.importorskip("mlflow")
    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    run_dir.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_QUEUED, str(run_dir), str(store)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["last_step"] == {}
    resumed = Trackers(run_dir, True, str(store), "", "run", {})
    for step in (1, 2, 3, 4):  # the resumed job trains steps 1-4 again (no checkpoint)
        resumed.log("train", step, {"loss": 1.0 / step})
    resumed.finish(False, [])
    assert _mlflow_history(store, run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["last_step"] == {"train": 4}


def test_mlflow_server_down_mid_run_costs_one_warning_during_the_run(tmp_path, monkeypatch,
                                                                     caplog):
    pytest.importorskip("mlflow")

    def down() -> None:
        raise ConnectionError("the tracker server is down")

    _store_metrics_through(monkeypatch, down)
    trackers = Trackers(tmp_path, True, str(tmp_path / "mlruns"), "", "run", {})
    step, deadline = 0, time.monotonic() + 20
    while trackers.active and time.monotonic() < deadline:  # training goes on meanwhile
        step += 1
        trackers.log("train", step, {"loss": 1.0})
        time.sleep(0.02)
    assert not trackers.active  # noticed during the run, not only at its end
    trackers.finish(True, [])
    warnings = [r for r in caplog.records if "mlflow tracker" in r.getMessage()]
    assert len(warnings) == 1 and "server is down" in warnings[0].getMessage()
    assert json.loads((tmp_path / STATE_FILE).read_text())["mlflow"]["last_step"] == {}


def test_mlflow_records_waiting_for_a_slow_server_are_bounded(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setattr(conadv.trackers, "PENDING_LIMIT", 3, raising=False)
    slow = threading.Event()
    _store_metrics_through(monkeypatch, lambda: slow.wait(timeout=30))
    store = tmp_path / "mlruns"
    trackers = Trackers(tmp_path, True, str(store), "", "run", {})
    opening = threading.Timer(0.5, slow.set)  # the server answers after 0.5 s
    opening.start()
    try:
        for step in (1, 2, 3):
            trackers.log("train", step, {"loss": 1.0})
        assert not slow.is_set()  # three records may wait for the server: no wait
        trackers.log("train", 4, {"loss": 1.0})
        assert slow.is_set()  # a fourth one waits for the oldest to be stored
        stored = json.loads((tmp_path / STATE_FILE).read_text())["mlflow"]["last_step"]
        assert stored["train"] >= 1
        trackers.finish(True, [])
    finally:
        slow.set()
        opening.cancel()
    assert _mlflow_history(store, tmp_path) == [1, 2, 3, 4]
    assert json.loads((tmp_path / STATE_FILE).read_text())["mlflow"]["last_step"] == {"train": 4}


def test_closing_waits_a_bounded_time_for_a_hung_server_and_marks_nothing_unconfirmed(
        tmp_path, monkeypatch):
    """A stopped job's grace period belongs to its checkpoint: closing gives the records on
    their way CLOSE_WAIT_S, then ends the tracked run; what the server never confirmed is not
    marked sent (a resumed run would send it again)."""
    monkeypatch.setattr(conadv.trackers, "CLOSE_WAIT_S", 0.5)
    hung = threading.Event()
    _store_metrics_through(monkeypatch, lambda: hung.wait(timeout=30))
    trackers = Trackers(tmp_path, True, str(tmp_path / "mlruns"), "", "run", {})
    try:
        trackers.log("train", 1, {"loss": 1.0})
        started = time.monotonic()
        trackers.finish(False, [])
        assert time.monotonic() - started < 5
    finally:
        hung.set()
    assert json.loads((tmp_path / STATE_FILE).read_text())["mlflow"]["last_step"] == {}
