"""Stop latency: seconds from a SIGTERM sent to every process of a job (as Slurm sends it at a
preemption or `scancel --signal=TERM --full`) to the job's exit with its checkpoint on disk,
beside the step time and the checkpoint write time that bound it. Slurm's KillWait and
torchrun's grace (30 s each by default) must cover it.

Cases: the demo (configs/demo.yaml) and the CPU benchmark model (the training-step benchmark's
small ResNet, ConAdv tau = 1, LARS, batch 64, synthetic data), each as a single process and as
torchrun with 2 ranks (launch/torchrun.sh), with 2 DataLoader workers per rank.

    python -m benchmarks.stop_latency --out benchmarks/results/<machine>-stop-latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import benchmark_main, machine_info

REPO = Path(__file__).resolve().parent.parent
COMMON = ["log.every_steps=1", "log.progress=false", "log.tensorboard=false",
          "checkpoint.every_steps=100000", "data.workers=2"]
MODELS = {
    "demo": ["--config", str(REPO / "configs/demo.yaml")],
    "benchmark_model": ["data.name=synthetic", "data.image_size=32", "data.eval_resize=32",
                        "data.synthetic_classes=10", "data.synthetic_samples=8192",
                        "model.arch=cifar_resnet", "model.cifar_width=32",
                        "model.cifar_blocks=2", "optim.name=lars", "adv.enabled=true",
                        "adv.tau=1", "train.global_batch=64", "train.device=cpu",
                        "train.epochs=100", "checkpoint.resume=none"],
}


def _job(pids_of: int) -> list[int]:
    """A process and all its descendants."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    job, frontier = [pids_of], [pids_of]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        job.extend(frontier)
    return job


def _train_records(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    records = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if record.get("kind") == "train":
            records.append(record)
    return records


def measure(model: str, ranks: int, warm_steps: int, run_dir: Path) -> dict[str, Any]:
    args = [*MODELS[model], *COMMON, f"log.run_dir={run_dir}"]
    if ranks:
        cmd = [str(REPO / "launch/torchrun.sh"), "--nproc-per-node", str(ranks), "--", *args]
    else:
        cmd = [sys.executable, "-m", "conadv.cli.train", *args]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while len(_train_records(metrics)) < warm_steps:
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{model} did not start: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    signalled_step = _train_records(metrics)[-1]["step"]
    sent = time.perf_counter()
    for pid in _job(process.pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, err = process.communicate(timeout=300)
    to_exit = time.perf_counter() - sent
    summary = json.loads((run_dir / "summary.json").read_text())
    step_times = [r["step_time"] for r in _train_records(metrics)[1:]]
    return {"model": model, "ranks": ranks or 1, "exit_status": process.returncode,
            "signal_to_exit_s": round(to_exit, 3),
            "signal_to_checkpoint_s": summary.get("stop_latency_s"),
            "checkpoint_write_s": summary.get("checkpoint_write_s"),
            "median_step_s": round(statistics.median(step_times), 4),
            "steps_after_signal": summary["steps"] - signalled_step,
            "stopped_at_step": summary["steps"], "terminated": summary["terminated"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for ranks in (0, 2):
                cases.append(measure(model, ranks, args.warm_steps,
                                     Path(tmp) / f"{model}-{ranks}"))
    return {"machine": machine_info(), "cases": cases}


def print_report(report: dict[str, Any]) -> None:
    print(f"{'model':16} {'ranks':>5} {'exit':>4} {'signal->exit s':>14} {'step s':>7} "
          f"{'ckpt write s':>12} {'steps after':>11}")
    for c in report["cases"]:
        print(f"{c['model']:16} {c['ranks']:5d} {c['exit_status']:4d} "
              f"{c['signal_to_exit_s']:14.2f} {c['median_step_s']:7.3f} "
              f"{c['checkpoint_write_s'] or 0:12.3f} {c['steps_after_signal']:11d}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-steps", type=int, default=8,
                        help="logged steps before the signal")
    parser.add_argument("--out", help="write the JSON report here")
    return parser.parse_args()


if __name__ == "__main__":
    benchmark_main(parse_args, run, print_report)
