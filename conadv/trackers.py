"""Experiment trackers beside TensorBoard: MLflow (`log.mlflow`) and Weights & Biases
(`log.wandb`), optional extras (`pip install '.[trackers]'`), driven by rank 0 only.

- **One tracked run per run directory.** Each tracker's run id is kept in
  `<run_dir>/trackers.json`, so a resumed or requeued job continues the same tracked run
  instead of starting a new one (a run directory replaced with `log.overwrite=true` starts a
  new one).
- **No duplicated metrics, none lost.** The same file keeps the last step the tracker has
  stored per record kind (train, eval). After a resume from an older checkpoint, the steps the
  tracker already has are not sent again: a resume is exact, so they would be the same values
  (MLflow would append a second value per step; W&B refuses steps that go back). A step counts
  as stored once the tracker has taken it (MLflow: its server answered), not when it was
  queued, so the steps a killed job had only queued are sent again by the resumed one.
- **The config goes in as parameters** (`section.key`, once, when the tracked run is
  created), the run's `summary.json`, `config.yaml` and its report figures as artifacts at
  the end.
- **A tracker never stops training.** One that is down, missing or refuses a call logs one
  warning and is switched off for the rest of the run (MLflow's metrics go out from a thread:
  a failure there is reported at the next record, a slow server delays training only once
  `PENDING_LIMIT` records wait for it).

A `file:` URI or a plain directory makes MLflow write a local store with no server (MLflow
keeps its file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is set for such
URIs). W&B honours WANDB_MODE=offline (no network; `wandb sync` uploads later).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"
# metric records that may wait for MLflow's server before a record waits for the oldest one
PENDING_LIMIT = 64
# how long closing waits for the records still on their way: a stopped job's grace period
# belongs to its checkpoint (Slurm's KillWait is 30 s); what is not confirmed is not marked sent
CLOSE_WAIT_S = 10.0


class _MLflow:
    name = "mlflow"

    def __init__(self, uri: str, run_id: str | None, run_name: str,
                 params: dict[str, str]) -> None:
        import mlflow  # noqa: F401 (a missing extra is reported like any failure)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if "://" not in uri and not uri.startswith("file:"):
            uri = Path(uri).resolve().as_uri()  # a directory
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # a server that is down: a few seconds, not MLflow's minutes of retries, then off
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name("conadv")
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment("conadv"))
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            items = [Param(key, value[:6000]) for key, value in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes 100 parameters a call
                self.client.log_batch(run_id, params=items[start:start + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.sent: dict[str, int] = {}  # the last step per record kind the server has stored
        # one thread, one call at a time, in order: a slow server delays the records, not the
        # training step. (Not MLflow's own asynchronous logging: its handles only block, so
        # what the server has stored would be known at the end only.)
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="conadv-mlflow")
        self._pending: deque[tuple[str, int, Future]] = deque()

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{kind}/{key}", value, now, step) for key, value in values.items()]
        self._pending.append((kind, step, self._sender.submit(
            self.client.log_batch, self.run_id, metrics=metrics, synchronous=True)))
        self._settle(len(self._pending) - PENDING_LIMIT)

    def _settle(self, wait_for: int, deadline: float | None = None) -> None:
        """Move the records the server has answered, oldest first, from pending to `sent`,
        after waiting for the oldest `wait_for` of them (until time.monotonic() `deadline`).
        A failed or overdue one raises (the tracker goes off) and drops the records behind
        it, unmarked."""
        while self._pending and (wait_for > 0 or self._pending[0][2].done()):
            kind, step, call = self._pending[0]
            wait_for -= 1
            try:
                call.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except Exception:  # the call's error, or a TimeoutError past the deadline
                self._pending.clear()
                self._sender.shutdown(wait=False, cancel_futures=True)
                raise
            self._pending.popleft()
            self.sent[kind] = step

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, finished: bool) -> None:
        try:  # what was queued, for CLOSE_WAIT_S at most, then the run's end
            self._settle(len(self._pending), time.monotonic() + CLOSE_WAIT_S)
        finally:
            self._sender.shutdown(wait=False, cancel_futures=True)
            self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class _Wandb:
    name = "wandb"

    def __init__(self, project: str, run_id: str | None, run_name: str,
                 params: dict[str, str], run_dir: Path) -> None:
        import wandb

        self.run = wandb.init(project=project, id=run_id or uuid.uuid4().hex[:8],
                              resume="allow", name=run_name, dir=str(run_dir),
                              config=params if run_id is None else None)
        self.run_id = self.run.id
        self.sent: dict[str, int] = {}  # the last step per record kind W&B has taken

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{kind}/{key}": value for key, value in values.items()}, step=step)
        self.sent[kind] = step

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            for file in ([p for p in path.rglob("*") if p.is_file()] if path.is_dir()
                         else [path] if path.exists() else []):
                self.run.save(str(file), base_path=str(path.parent), policy="now")

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 75)


class Trackers:
    """The trackers a run's config asks for, on rank 0 (elsewhere, and with none asked for,
    every call does nothing)."""

    def __init__(self, run_dir: Path, enabled: bool, mlflow_uri: str, wandb_project: str,
                 run_name: str, params: dict[str, Any]) -> None:
        self.path = Path(run_dir) / STATE_FILE
        self.state: dict[str, dict[str, Any]] = {}
        self.active: list[Any] = []
        # the last step per record kind handed to each tracker (stored, or still on its way)
        self.handed: dict[str, dict[str, int]] = {}
        if not enabled or not (mlflow_uri or wandb_project):
            return
        try:
            self.state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.state = {}
        texts = {key: str(value) for key, value in params.items()}
        wanted = [("mlflow", mlflow_uri, lambda saved: _MLflow(mlflow_uri, saved, run_name,
                                                               texts)),
                  ("wandb", wandb_project, lambda saved: _Wandb(wandb_project, saved, run_name,
                                                                texts, Path(run_dir)))]
        for name, setting, start in wanted:
            if not setting:
                continue
            saved = self.state.get(name, {}).get("run_id")
            try:
                tracker = start(saved)
            except Exception as err:  # noqa: BLE001 (an import, a network, a server: any)
                log.warning("the %s tracker is off for this run: %s", name,
                            str(err).splitlines()[0][:300] if str(err) else type(err).__name__)
                continue
            self.state.setdefault(name, {"last_step": {}})["run_id"] = tracker.run_id
            self.handed[name] = dict(self.state[name]["last_step"])
            self.active.append(tracker)
        self._save()

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.active:
            return
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in list(self.active):
            if step <= self.handed[tracker.name].get(kind, -1):
                continue  # sent before this run resumed from an older checkpoint
            if self._call(tracker, "log", kind, step, numbers):
                self.handed[tracker.name][kind] = step
            self._stored(tracker)
        self._save()

    def finish(self, finished: bool, artifacts: list[Path],
               report: Callable[[], Path] | None = None) -> None:
        """Close the tracked runs. A finished run first sends `artifacts` and the directory
        `report()` writes (unless it fails: figures are a courtesy); a stopped one sends
        nothing, so that a preempted job spends its grace period on its checkpoint."""
        if self.active and finished and report is not None:
            try:
                artifacts = [*artifacts, report()]
            except Exception as err:  # noqa: BLE001
                log.warning("no report figures for the trackers: %s", err)
        if not self.active:
            return
        for tracker in list(self.active):
            if finished:
                self._call(tracker, "artifacts", artifacts)
            self._call(tracker, "close", finished)  # always: the tracked run is ended
            self._stored(tracker)
        self.active = []
        self._save()

    def _call(self, tracker: Any, method: str, *args: Any) -> bool:
        try:
            getattr(tracker, method)(*args)
            return True
        except Exception as err:  # noqa: BLE001
            log.warning("the %s tracker failed (%s) and is off for the rest of this run",
                        tracker.name, str(err).splitlines()[0][:300] if str(err) else
                        type(err).__name__)
            if tracker in self.active:  # closing a tracker that failed just before
                self.active.remove(tracker)
            return False

    def _stored(self, tracker: Any) -> None:
        """Count the steps `tracker` has stored as sent (also those before it failed)."""
        self.state[tracker.name]["last_step"].update(tracker.sent)

    def _save(self) -> None:
        try:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.path)
        except OSError as err:  # a full disk stops the run at its checkpoint, not here
            if self.active:
                log.warning("cannot write %s (%s); the trackers are off for the rest of this "
                            "run", self.path, err.strerror or err)
            self.active = []
