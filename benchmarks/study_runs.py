"""One training run of a study, cached: what it trains (the config overrides), how it is
measured, and a runner that trains the runs a cache lacks, two at a time on 2 cores.

A run's record is written whole or not at all under a hash of its overrides, so an interrupted
study resumes with the runs it is missing and a rerun never trains a finished run again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Run:
    arm: str
    batch: int
    seed: int
    epochs: float
    lr: float
    holdout: str  # "validation" while tuning, "test" for the reported runs
    settings: tuple[str, ...]  # every override but the five above
    sharpness_images: int = 0  # training images the sharpness is measured on; 0: not measured

    def overrides(self) -> list[str]:
        return [*self.settings, f"data.holdout={self.holdout}",
                f"train.global_batch={self.batch}", f"train.seed={self.seed}",
                f"train.epochs={self.epochs:g}", f"schedule.warmup_epochs={self.epochs / 6:g}",
                f"optim.lr={self.lr:g}"]

    @property
    def key(self) -> str:
        text = "\n".join([self.arm, *self.overrides(), f"sharpness:{self.sharpness_images}"])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def cost(self) -> float:
        """Relative training cost, to start the longest runs first."""
        return self.epochs * (2.7 if "conadv" in self.arm else 1.0)


def train_and_measure(run: Run, cache: Path) -> dict[str, Any]:
    """Train one run (in a worker process, one torch thread), measure it, cache its record."""
    import torch

    from conadv.config import load_config
    from conadv.errors import TrainingDiverged
    from conadv.train.eval_job import run_evaluation
    from conadv.train.job import train

    torch.set_num_threads(1)
    run_dir = cache / "runs" / run.key
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off by an interruption
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [*run.overrides(), f"log.run_dir={run_dir}"])
    log = cache / "logs" / f"{run.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    saved_stderr = sys.stderr
    with log.open("w") as sys.stderr:  # conadv's log lines go to the run's log file
        try:
            started = time.perf_counter()
            try:
                summary = train(cfg)
            except TrainingDiverged:
                if run.holdout != "validation":
                    raise
                # a tuning LR that diverges is a result of the grid: it fits nothing
                summary = {"finished": True, "steps": 0, "train_time_s": 0.0,
                           "compute": {"forward_equivalents": 0},
                           "final_eval": {"top1": 0.0, "train_top1": 0.0}}
            if not summary["finished"]:  # a Ctrl-C stops a run with a checkpoint: no result
                raise RuntimeError(f"run {run.key} stopped at step {summary['steps']}: "
                                   f"{summary['stop_reason']}")
            final = summary["final_eval"]
            record: dict[str, Any] = {
                "arm": run.arm, "batch": run.batch, "seed": run.seed, "epochs": run.epochs,
                "lr": run.lr, "holdout": run.holdout, "steps": summary["steps"],
                "top1": final["top1"], "train_top1": final["train_top1"],
                "gap": final["train_top1"] - final["top1"], "train_s": summary["train_time_s"],
                "forward_equivalents": summary["compute"]["forward_equivalents"]}
            if run.holdout == "test":
                record["pgd_steps"] = cfg.eval.pgd_steps
                record["pgd_top1"] = final[f"pgd{cfg.eval.pgd_steps}_top1"]
            if run.sharpness_images:
                measured = run_evaluation(cfg, run_dir, sharpness_images=run.sharpness_images)
                record.update({f"sharp_{k}": v for k, v in measured["sharpness"].items()
                               if k in SHARPNESS})
            record["wall_s"] = time.perf_counter() - started
        finally:
            sys.stderr = saved_stderr
    shutil.rmtree(run_dir)
    record["key"], record["overrides"] = run.key, run.overrides()
    path = cache / f"{run.key}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)  # a record is whole or absent
    return record


# what conadv.train.sharpness reports that a study keeps (as sharp_<name>)
SHARPNESS = ("hessian_top_eigenvalue", "keskar_sharpness", "increase", "first_order",
             "second_order")


def cached(run: Run, cache: Path) -> dict[str, Any] | None:
    path = cache / f"{run.key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def finished_runs(cache: Path) -> set[Path]:
    return {p for p in cache.glob("*.json") if len(p.stem) == 16}


def run_all(runs: list[Run], cache: Path, workers: int) -> tuple[list[dict[str, Any]], int]:
    """Records of `runs` (in their order), training those not in the cache `workers` at a
    time, longest first; and how many were trained."""
    records = {run.key: cached(run, cache) for run in runs}
    missing = sorted({run.key: run for run in runs if records[run.key] is None}.values(),
                     key=lambda r: -r.cost)
    if missing:
        context = multiprocessing.get_context("spawn")  # no forked torch state
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(train_and_measure, run, cache): run for run in missing}
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:  # the runs not started yet are dropped
                    pool.shutdown(wait=False, cancel_futures=True)
                record = future.result()
                records[record["key"]] = record
                print(f"{record['arm']:13s} batch {record['batch']:4d} seed {record['seed']:2d} "
                      f"{record['epochs']:5g} epochs lr {record['lr']:<4g} "
                      f"{record['holdout']:10s}: top-1 {record['top1']:6.2f}  train "
                      f"{record['train_top1']:6.2f}  ({record['wall_s']:.0f} s)", flush=True)
    return [records[run.key] for run in runs], len(missing)


def record_invocation(cache: Path, wall_s: float, trained: int,
                      interrupted: bool = False) -> list[dict[str, Any]]:
    """Every invocation that trained runs, in order (the study's wall time is their sum)."""
    path = cache / "invocations.json"
    invocations = json.loads(path.read_text()) if path.is_file() else []
    if trained or not invocations:
        invocations.append({"wall_s": round(wall_s, 1), "trained": trained,
                            "interrupted": interrupted,
                            "ended": time.strftime("%Y-%m-%d %H:%M:%S")})
        path.write_text(json.dumps(invocations, indent=1) + "\n")
    return invocations
