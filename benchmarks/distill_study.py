"""Distillation on the digits: three wide teachers trained by
conadv, distilled (MEAL V2 style: their mean softmax, no hard labels) into a narrow student.

Every student trains the same narrow ResNet for the same epochs at the same global batch with
LAMB (the digits recipe: peak LR scaled from batch 64 by the square root, a quarter of the
epochs of warm-up, polynomial decay), once per method and seed:

- alone: hard labels only (the baseline);
- distilled: the teachers' mean softmax, hard weight 0 (as published);
- distilled T=4: the same at temperature 4 (softer targets, Hinton et al.'s setting);
- distilled+disc: the same plus MEAL V2's output discriminator;
- distilled+tau1: distillation with ConAdv (tau = 1) on.

Output in --out: distillation.json (every run) and distillation.md (mean +- std test top-1 and
PGD-10 top-1 per batch and method, the teachers and their ensemble's accuracy).

    python -m benchmarks.distill_study --out docs/results          # ~9 min on 2 cores
    python -m benchmarks.distill_study --quick --out /tmp/distill  # a reduced grid
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, mean_std

TEACHER = ["model.cifar_width=16", "train.global_batch=64"]
STUDENT = ["model.cifar_width=4"]
METHODS = {
    "alone": [],
    "distilled": ["distill.enabled=true"],
    "distilled T=4": ["distill.enabled=true", "distill.temperature=4"],
    "distilled+disc": ["distill.enabled=true", "distill.discriminator=true",
                       "distill.discriminator_lr=1e-3"],
    "distilled+tau1": ["distill.enabled=true", "adv.enabled=true", "adv.tau=1"],
}

# the digits recipe: a small ResNet at 16 px, LAMB with the square-root LR rule from batch 64,
# polynomial decay, evaluation of the train-test gap and of PGD-10 at eps 8/255
COMMON = [
    "data.name=digits", "data.image_size=16", "data.eval_resize=16", "data.min_crop_scale=0.7",
    "data.hflip=false", "data.workers=0", "model.arch=cifar_resnet", "model.cifar_width=8",
    "optim.base_batch=64", "schedule.decay=poly", "schedule.poly_power=2",
    "train.device=cpu", "train.eval_every_epochs=0", "train.eval_train_images=360",
    "eval.robust=true", "eval.epsilon=0.03137254901960784",
    "eval.step_size=0.00784313725490196", "log.progress=false", "log.tensorboard=false",
    "checkpoint.resume=none", "checkpoint.keep_last=1", "checkpoint.every_steps=1000000",
]
LAMB = ["optim.name=lamb", "optim.lr=0.005", "optim.scale_rule=sqrt", "optim.weight_decay=0.01"]


def _train(overrides: list[str]) -> dict[str, Any]:
    from conadv.config import load_config
    from conadv.train.job import train

    return train(load_config(None, overrides))


def train_teachers(count: int, epochs: float, root: Path) -> list[dict[str, Any]]:
    teachers = []
    for i in range(count):
        run_dir = root / f"teacher{i}"
        started = time.perf_counter()
        summary = _train([*COMMON, *LAMB, *TEACHER, f"train.seed={100 + i}",
                          f"train.epochs={epochs}", f"schedule.warmup_epochs={epochs / 4}",
                          f"log.run_dir={run_dir}"])
        teachers.append({"run_dir": str(run_dir), "top1": summary["final_eval"]["top1"],
                         "pgd10_top1": summary["final_eval"]["pgd10_top1"],
                         "wall_s": time.perf_counter() - started})
        print(f"teacher {i}: top-1 {teachers[-1]['top1']:.2f}", flush=True)
    return teachers


def ensemble_top1(teachers: list[dict[str, Any]]) -> float:
    """Test top-1 of the teachers' mean softmax: what the students are taught."""
    import torch

    from conadv.config import load_config
    from conadv.data import build_eval_loader
    from conadv.data.device import images_to_device
    from conadv.distill import build_teachers

    cfg = load_config(None, [*COMMON, "distill.enabled=true", _teacher_list(teachers)])
    ensemble = build_teachers(cfg.distill, 10, torch.device("cpu"), False, None)
    loader = build_eval_loader(cfg.data, 1, 0, 256, torch.device("cpu"))
    correct = total = 0
    for batch in loader:
        probs = ensemble(images_to_device(batch["image"], torch.device("cpu"), False))
        valid = batch["valid"].bool()
        correct += int((probs.argmax(1) == batch["label"])[valid].sum())
        total += int(valid.sum())
    return 100.0 * correct / total


def _teacher_list(teachers: list[dict[str, Any]]) -> str:
    return "distill.teachers=[" + ", ".join(f"{{weights: {t['run_dir']}}}"
                                            for t in teachers) + "]"


def run_student(method: str, batch: int, seed: int, epochs: float, teachers: list[dict],
                run_dir: Path) -> dict[str, Any]:
    overrides = [*COMMON, *LAMB, *STUDENT, *METHODS[method],
                 f"train.global_batch={batch}", f"train.seed={seed}", f"train.epochs={epochs}",
                 f"schedule.warmup_epochs={epochs / 4}", f"log.run_dir={run_dir}"]
    if "distill.enabled=true" in overrides:
        overrides.append(_teacher_list(teachers))
    started = time.perf_counter()
    summary = _train(overrides)
    final = summary["final_eval"]
    return {"method": method, "batch": batch, "seed": seed, "steps": summary["steps"],
            "top1": final["top1"], "pgd10_top1": final["pgd10_top1"],
            "gap": final["train_test_gap"], "train_s": summary["train_time_s"],
            "wall_s": time.perf_counter() - started}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["batch"], run["method"]), []).append(run)
    rows = []
    for (batch, method), group in sorted(cells.items(),
                                         key=lambda kv: (kv[0][0], list(METHODS).index(kv[0][1]))):
        row = {"batch": batch, "method": method, "seeds": len(group), "steps": group[0]["steps"]}
        for key in ("top1", "gap", "pgd10_top1", "train_s"):
            row[key] = mean_std([r[key] for r in group])
        rows.append(row)
    return rows


def write_table(report: dict[str, Any], path: Path) -> None:
    teachers = report["teachers"]
    lines = ["# Distillation on the digits", "",
             f"Made by `{report['command']}` in {report['wall_s'] / 60:.1f} minutes "
             f"({report['machine']['cpu']}, {report['machine']['cores']} cores).", "",
             f"Teachers: {len(teachers)} CIFAR ResNets of width 16 (LAMB, batch 64, "
             f"{report['epochs']:g} epochs): test top-1 "
             + ", ".join(f"{t['top1']:.2f}" for t in teachers)
             + f"; their ensemble (mean softmax) {report['ensemble_top1']:.2f}. Students: width 4 "
             f"({report['student_params']:,} parameters vs {report['teacher_params']:,} per "
             "teacher), LAMB, same epochs, batch and schedule for every method. Mean +- "
             "standard deviation over seeds; PGD-10 at eps 8/255; train-test gap = top-1 on "
             "360 training images minus test top-1.", "",
             "| global batch | steps | method | test top-1 % | train-test gap | PGD-10 top-1 % | "
             "train time s |", "|---|---|---|---|---|---|---|"]
    for row in report["cells"]:
        cells = [f"{row[k][0]:.2f} +- {row[k][1]:.2f}" for k in ("top1", "gap", "pgd10_top1")]
        lines.append(f"| {row['batch']} | {row['steps']} | {row['method']} | "
                     f"{' | '.join(cells)} | {row['train_s'][0]:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def _params(width: int) -> int:
    from conadv.models.factory import CifarResNet

    return sum(p.numel() for p in CifarResNet(10, width=width).parameters())


def run(out: Path, batches: list[int], seeds: int, epochs: float, teacher_count: int,
        methods: list[str], command: str) -> dict[str, Any]:
    logging.getLogger("conadv").setLevel(logging.WARNING)
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        teachers = train_teachers(teacher_count, epochs, Path(tmp))
        ensemble = ensemble_top1(teachers)
        print(f"teacher ensemble: top-1 {ensemble:.2f}", flush=True)
        for batch in batches:
            for method in methods:
                for seed in range(seeds):
                    run_dir = Path(tmp) / f"student_{batch}_{method}_{seed}"
                    result = run_student(method, batch, seed, epochs, teachers, run_dir)
                    runs.append(result)
                    print(f"batch {batch:5d} {method:15s} seed {seed}: top-1 "
                          f"{result['top1']:6.2f}  PGD-10 {result['pgd10_top1']:6.2f}  "
                          f"({result['wall_s']:.0f} s)", flush=True)
    wall = time.perf_counter() - started
    for teacher in teachers:
        teacher.pop("run_dir")
    report = {"command": command, "wall_s": wall, "machine": machine_info(), "epochs": epochs,
              "seeds": seeds, "settings": {"common": COMMON, "optimizer": LAMB,
                                           "teacher": TEACHER, "student": STUDENT,
                                           "methods": METHODS},
              "teachers": teachers, "ensemble_top1": ensemble, "teacher_params": _params(16),
              "student_params": _params(4), "runs": runs, "cells": summarize(runs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "distillation.json").write_text(json.dumps(report, indent=1) + "\n")
    write_table(report, out / "distillation.md")
    print(f"wrote {out}/distillation.{{md,json}} in {wall / 60:.1f} minutes")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teachers", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true",
                        help="batch 64, alone and distilled, 2 teachers, 1 seed, half an "
                             "epoch (checks the pipeline, not the science)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.methods = [64], ["alone", "distilled"]
        args.teachers, args.seeds, args.epochs = 2, 1, 0.5
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = "python -m benchmarks.distill_study " + " ".join(
        sys.argv[1:] if argv is None else argv)
    return run(args.out, args.batches, args.seeds, args.epochs, args.teachers, args.methods,
               command)


if __name__ == "__main__":
    main()
