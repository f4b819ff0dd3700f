"""Run telemetry on rank 0: metrics.jsonl, TensorBoard events, a tqdm progress bar and the final
summary.json. Other ranks get a no-op instance, so callers never branch on the rank."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged, not the one at set-up (which a
    host application, or a test capturing output, may have replaced since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(is_main: bool) -> None:
    """conadv's log lines to stderr: INFO on rank 0, warnings only elsewhere. Configures the
    `conadv` logger alone, leaving the root logger to the host application."""
    logger = logging.getLogger("conadv")
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if not any(getattr(h, "conadv_handler", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.conadv_handler = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


class Telemetry:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, initial_step: int, run_id: str | None = None,
                 trackers: Any = None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.run_id = run_id  # in every record: whose record it is
        self.trackers = trackers  # experiment trackers (conadv.trackers), sent every record
        self._metrics = None
        self._writer = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (run_dir / "metrics.jsonl").open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"))
        if progress:
            # disable=None: no bar when stderr is not a terminal (batch jobs, CI logs), where
            # the log line below is written instead
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train",
                             dynamic_ncols=True, file=sys.stderr, disable=None)

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One JSON line ({'kind': 'train'|'eval', 'step': ..., **values}) and TB scalars."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "run": self.run_id, "time": round(time.time(), 3),
                  **values}
        self._metrics.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(kind, step, values)
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)
        shown = {k: values[k] for k in ("loss", "lr", "img_per_s", "top1", "pgd10_top1")
                 if k in values}
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        else:
            log.info("%s step %d: %s", kind, step,
                     " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.enabled:
            write_summary(self.run_dir, summary)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._metrics is not None:
            self._metrics.close()


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, whole or not at all: a scheduler's script decides on it (launch/
    slurm.sbatch), also after a kill in the middle of the write."""
    tmp = run_dir / f"summary.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, run_dir / "summary.json")
