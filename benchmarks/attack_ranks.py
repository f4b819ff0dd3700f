"""Attack ranks on the CPU: bytes moved per step and the trainers' step time with the attack
inline (2 ranks) and on an attack rank of its own (2 trainers + 1 attack rank, weights in fp32
and in bf16), ConAdv tau = 1, through real torchrun rendezvous (gloo), in one invocation.

On a 2-core machine the three processes share two cores, so this shows the cost and the bytes,
not a speed-up: an attack rank needs a device of its own to take the attack off the trainers'
critical path. `benchmarks/scaling_model.py` turns the bytes into the 96K prediction.

    python -m benchmarks.attack_ranks [--steps 30] [--device cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import benchmark_main, machine_info

REPO = Path(__file__).resolve().parent.parent
CONFIG = [
    "data.name=digits", "data.image_size=32", "data.eval_resize=32", "data.hflip=false",
    "data.workers=0", "model.arch=cifar_resnet", "model.cifar_width=16", "optim.name=lars",
    "optim.lr=0.5", "train.global_batch=64", "train.eval_every_epochs=0",
    "adv.enabled=true", "adv.tau=1", "log.tensorboard=false", "log.progress=false",
    "log.every_steps=1", "checkpoint.resume=none", "checkpoint.every_steps=1000000",
]
LAYOUTS = {
    "inline (2 trainers)": (2, []),
    "attack rank, fp32 weights (2 + 1)": (3, ["adv.attack_ranks=1"]),
    "attack rank, bf16 weights (2 + 1)": (3, ["adv.attack_ranks=1", "adv.attack_weights=bf16"]),
}


def run_layout(nproc: int, extra: list[str], steps: int, run_dir: Path, port: int,
               device: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--nnodes=1", f"--master-port={port}", "-m", "conadv.cli.train", *CONFIG,
               f"train.device={device}", f"train.max_steps={steps}", f"log.run_dir={run_dir}",
               *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["step_time"] for r in records if r["kind"] == "train"][steps // 5:]
    summary = json.loads((run_dir / "summary.json").read_text())
    link = summary.get("attack_link", {})
    return {"processes": nproc, "overrides": extra,
            "trainer_step_ms": 1000 * statistics.median(step_times),
            "weights_out_bytes_per_step": link.get("weights_out_bytes_per_step", 0.0),
            "images_in_bytes_per_trainer_step": link.get("images_in_bytes_per_step", 0.0),
            "trainer_wait_ms_per_step": 1000 * link.get("wait_s_per_step", 0.0)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (nproc, extra)) in enumerate(LAYOUTS.items()):
            results[name] = run_layout(nproc, extra, args.steps, Path(tmp) / str(i),
                                       29500 + os.getpid() % 1000 + 7 * i, args.device)
    inline = results["inline (2 trainers)"]["trainer_step_ms"]
    for row in results.values():
        row["step_ratio_to_inline"] = row["trainer_step_ms"] / inline
    return {"benchmark": "attack_ranks", "machine": machine_info(), "device": args.device,
            "steps": args.steps,
            "config": CONFIG, "layouts": results}


def print_report(report: dict[str, Any]) -> None:
    print(f"ConAdv tau=1, width-16 CIFAR ResNet, batch 64 = 2 trainers x 32 "
          f"({report['machine']['cores']} cores)")
    for name, r in report["layouts"].items():
        print(f"  {name:36s} step {r['trainer_step_ms']:7.1f} ms "
              f"(x{r['step_ratio_to_inline']:.2f})  weights out "
              f"{r['weights_out_bytes_per_step'] / 1e6:6.3f} MB/step  images in "
              f"{r['images_in_bytes_per_trainer_step'] / 1e6:6.3f} MB/trainer/step  waited "
              f"{r['trainer_wait_ms_per_step']:6.1f} ms/step")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda needs one GPU per rank (3): NCCL refuses two ranks on one")
    parser.add_argument("--out")
    return parser.parse_args()


if __name__ == "__main__":
    benchmark_main(parse_args, run, print_report)
