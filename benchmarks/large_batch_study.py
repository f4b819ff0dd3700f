"""The large-batch study on the bundled digits: does ConAdv win back what a large batch loses?

Every cell trains the same small ResNet for the same number of epochs at one global batch, with
LARS or LAMB, for each method: vanilla, sequential adversarial (tau = 0), ConAdv (tau = 1, 2)
and ConAdv with the augmented (AutoAugment) second view and its own BatchNorm; three seeds.
Hyper-parameters follow the project's documented rules and are not tuned per cell (nor on the
test split): the peak LR is scaled from batch 64 (linear for LARS, square root for LAMB), the
warm-up is a quarter of the epochs, then polynomial decay (power 2), as in the MLPerf recipes.

Output in --out: large_batch_study.json (every run), large_batch_study.md (mean +- std of test
top-1, train-test gap, PGD-10 accuracy and wall time per cell, with the command and wall time
of the study) and large_batch_study.png (test top-1 against global batch, a line per method).

    python -m benchmarks.large_batch_study --out docs/results        # ~30 min on 2 cores
    python -m benchmarks.large_batch_study --quick --out /tmp/study  # a reduced grid
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info

METHODS = {
    "vanilla": ["adv.enabled=false"],
    "tau0": ["adv.enabled=true", "adv.tau=0"],
    "tau1": ["adv.enabled=true", "adv.tau=1"],
    "tau2": ["adv.enabled=true", "adv.tau=2"],
    "tau1+aug": ["adv.enabled=true", "adv.tau=1", "data.augment=autoaugment",
                 "data.second_view=true"],
}
# peak LR at batch 64 and the documented scaling rule per optimizer (not tuned per cell)
OPTIMIZERS = {
    "lars": ["optim.name=lars", "optim.lr=0.5", "optim.scale_rule=linear",
             "optim.weight_decay=5e-5"],
    "lamb": ["optim.name=lamb", "optim.lr=0.005", "optim.scale_rule=sqrt",
             "optim.weight_decay=0.01"],
}
COMMON = [
    "data.name=digits", "data.image_size=16", "data.eval_resize=16", "data.min_crop_scale=0.7",
    "data.hflip=false", "data.workers=0", "model.arch=cifar_resnet", "model.cifar_width=8",
    "optim.base_batch=64", "schedule.decay=poly", "schedule.poly_power=2",
    "train.device=cpu", "train.eval_every_epochs=0", "train.eval_train_images=360",
    "eval.robust=true", "eval.epsilon=0.03137254901960784",
    "eval.step_size=0.00784313725490196", "log.progress=false", "log.tensorboard=false",
    "checkpoint.resume=none", "checkpoint.keep_last=1", "checkpoint.every_steps=1000000",
]


def run_cell(optimizer: str, method: str, batch: int, seed: int, epochs: float,
             run_dir: Path) -> dict[str, Any]:
    from conadv.config import load_config
    from conadv.train.trainer import train

    overrides = [*COMMON, *OPTIMIZERS[optimizer], *METHODS[method],
                 f"train.global_batch={batch}", f"train.seed={seed}", f"train.epochs={epochs}",
                 f"schedule.warmup_epochs={epochs / 4}", f"log.run_dir={run_dir}"]
    started = time.perf_counter()
    summary = train(load_config(None, overrides))
    final = summary["final_eval"]
    return {"optimizer": optimizer, "method": method, "batch": batch, "seed": seed,
            "steps": summary["steps"], "top1": final["top1"], "train_top1": final["train_top1"],
            "gap": final["train_test_gap"], "pgd10_top1": final["pgd10_top1"],
            "train_s": summary["train_time_s"], "wall_s": time.perf_counter() - started}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["optimizer"], run["batch"], run["method"]), []).append(run)
    rows = []
    for (optimizer, batch, method), group in sorted(
            cells.items(), key=lambda kv: (kv[0][0], kv[0][1], list(METHODS).index(kv[0][2]))):
        row = {"optimizer": optimizer, "batch": batch, "method": method, "seeds": len(group),
               "steps": group[0]["steps"]}
        for key in ("top1", "gap", "pgd10_top1", "train_s"):
            row[key] = mean_std([r[key] for r in group])
        rows.append(row)
    return rows


def write_table(rows: list[dict[str, Any]], path: Path, command: str, wall_s: float) -> None:
    lines = ["# Large-batch study on the digits", "",
             f"Made by `{command}` in {wall_s / 60:.1f} minutes "
             f"({machine_info()['cpu']}, {machine_info()['cores']} cores). Mean +- standard "
             "deviation over seeds; train-test gap = top-1 on 360 training images (no "
             "augmentation) minus test top-1; PGD-10 at eps 8/255.", "",
             "| optimizer | global batch | steps | method | test top-1 % | train-test gap | "
             "PGD-10 top-1 % | train time s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[k][0]:.2f} +- {row[k][1]:.2f}" for k in ("top1", "gap", "pgd10_top1")]
        lines.append(f"| {row['optimizer']} | {row['batch']} | {row['steps']} | {row['method']} "
                     f"| {' | '.join(cells)} | {row['train_s'][0]:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = sorted({r["optimizer"] for r in rows})
    fig, axes = plt.subplots(1, len(optimizers), figsize=(6 * len(optimizers), 4.2),
                             squeeze=False)
    for ax, optimizer in zip(axes[0], optimizers):
        for i, method in enumerate(METHODS):
            mine = [r for r in rows if r["optimizer"] == optimizer and r["method"] == method]
            if not mine:
                continue
            ax.errorbar([r["batch"] for r in mine], [r["top1"][0] for r in mine],
                        yerr=[r["top1"][1] for r in mine], marker="o", capsize=3,
                        label=method, color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"digits, same epochs per batch, {optimizer.upper()}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=list(OPTIMIZERS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lamb-methods", nargs="+", default=list(METHODS),
                        choices=list(METHODS), help="the methods run with LAMB")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true",
                        help="a reduced grid: batches 64 and 256, vanilla and tau1, LARS, "
                             "1 seed, half an epoch (checks the pipeline, not the science)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.methods, args.optimizers = [64, 256], ["vanilla", "tau1"], ["lars"]
        args.lamb_methods = []
        args.seeds, args.epochs = 1, 0.5
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("conadv").setLevel(logging.WARNING)
    command = "python -m benchmarks.large_batch_study " + " ".join(
        sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in args.optimizers:
            methods = args.lamb_methods if optimizer == "lamb" else args.methods
            for batch in args.batches:
                for method in methods:
                    for seed in range(args.seeds):
                        run = run_cell(optimizer, method, batch, seed, args.epochs,
                                       Path(tmp) / f"{optimizer}_{batch}_{method}_{seed}")
                        runs.append(run)
                        print(f"{optimizer} batch {batch:5d} {method:9s} seed {seed}: top-1 "
                              f"{run['top1']:6.2f}  gap {run['gap']:6.2f}  PGD-10 "
                              f"{run['pgd10_top1']:6.2f}  ({run['wall_s']:.0f} s)", flush=True)
    wall = time.perf_counter() - started
    rows = summarize(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "wall_s": wall, "machine": machine_info(),
              "settings": {"common": COMMON, "optimizers": OPTIMIZERS, "methods": METHODS,
                           "lamb_methods": args.lamb_methods, "epochs": args.epochs,
                           "seeds": args.seeds},
              "runs": runs, "cells": rows}
    (args.out / "large_batch_study.json").write_text(json.dumps(report, indent=1) + "\n")
    write_table(rows, args.out / "large_batch_study.md", command, wall)
    plot(rows, args.out / "large_batch_study.png")
    print(f"wrote {args.out}/large_batch_study.{{md,json,png}} in {wall / 60:.1f} minutes")
    return report


if __name__ == "__main__":
    main()
