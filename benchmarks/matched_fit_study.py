"""The matched-fit study on real MNIST: when a large batch fits the training set as well as a
small one and still generalises worse, does ConAdv close part of that gap, and does it make the
minimum flatter?

Design (the rules that decide the verdict are in README.md, written before the runs):

- data: the bundled MNIST (3,000 training / 500 validation / 1,500 test images, 12 px), a
  small CIFAR ResNet (width 4), LARS with a linear warm-up over a sixth of the run and
  polynomial decay (power 2); the BatchNorm micro-batch is 75 images in every cell
  (train.max_per_device_batch), so only the optimizer's batch differs;
- batches: 75 (small) against 375 and 750 (1/8 and 1/4 of the training split), trained long
  enough that large-batch vanilla fits the whole training split (>= 99.5 % in eval mode);
- learning rate: for each batch, vanilla's peak LR is chosen on the validation split from a
  small grid (one seed; among the LRs that fit the training split, the highest validation
  top-1, ties to the smaller LR); every arm at that batch reuses it, as the paper reused its
  vanilla recipe; the test split is read only by the reported cells (the grids were set by
  pilots on the validation split: LARS at batch 75 under-fits below 2, batch 750 diverges at
  8);
- arms: vanilla and ConAdv tau = 1 at every batch, ConAdv tau = 0 at the largest, and vanilla
  at the largest trained for ConAdv's compute (its epochs times the measured ratio of ConAdv's
  to vanilla's training time there); seeds 0..9 at the large batches, 0..4 at the small one;
- per run: test top-1, top-1 on the whole training split (eval mode), the gap, PGD-10 top-1,
  the training loss's largest Hessian eigenvalue and worst-case increase in a rho-box
  (conadv.train.sharpness, on 256 training images), training time.

Every run is cached in --cache under a hash of its overrides: an interrupted study resumes
with the runs it is missing. Two runs go at a time, one torch thread each (2 cores).

    python -m benchmarks.matched_fit_study --out docs/results          # `make study`
    python -m benchmarks.matched_fit_study --quick --out /tmp/study    # checks the pipeline
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info

COMMON = [
    "data.name=mnist", "data.image_size=12", "data.eval_resize=12", "data.min_crop_scale=1.0",
    "data.hflip=false", "data.workers=0", "model.arch=cifar_resnet", "model.cifar_width=4",
    "optim.name=lars", "optim.scale_rule=linear", "optim.base_batch=64",
    "optim.weight_decay=5e-5", "schedule.decay=poly", "schedule.poly_power=2",
    "train.device=cpu", "train.max_per_device_batch=75", "train.eval_every_epochs=0",
    "train.eval_train_images=3000", "eval.robust=true", "eval.epsilon=0.03137254901960784",
    "eval.step_size=0.00784313725490196", "log.progress=false", "log.tensorboard=false",
    "checkpoint.resume=none", "checkpoint.keep_last=1", "checkpoint.every_steps=1000000",
]
ARMS = {
    "vanilla": ["adv.enabled=false"],
    "conadv_tau1": ["adv.enabled=true", "adv.tau=1"],
    "conadv_tau0": ["adv.enabled=true", "adv.tau=0"],
    "vanilla_long": ["adv.enabled=false"],  # at ConAdv's compute: more epochs
}


@dataclass(frozen=True)
class Design:
    small: int
    large: tuple[int, ...]
    epochs: dict[int, float]
    seeds: dict[int, int]
    lr_grid: dict[int, tuple[float, ...]]  # peak LR at batch 64 (scaled linearly)
    extra: tuple[str, ...] = ()  # overrides of every run
    sharpness_images: int = 256  # training images the sharpness is measured on

    @property
    def batches(self) -> tuple[int, ...]:
        return (self.small, *self.large)

    @property
    def largest(self) -> int:
        return max(self.large)


FULL = Design(small=75, large=(375, 750), epochs={75: 20, 375: 30, 750: 30},
              seeds={75: 5, 375: 10, 750: 10},
              lr_grid={75: (2.0, 4.0, 8.0), 375: (1.0, 2.0, 4.0), 750: (1.0, 2.0, 4.0)})
QUICK = Design(small=75, large=(375,), epochs={75: 1.0, 375: 2.0}, seeds={75: 2, 375: 2},
               lr_grid={75: (0.5,), 375: (1.0, 2.0)},
               extra=("train.max_steps=3", "train.eval_train_images=150", "eval.pgd_steps=2"),
               sharpness_images=32)


@dataclass(frozen=True)
class Run:
    arm: str
    batch: int
    seed: int
    epochs: float
    lr: float
    holdout: str  # "validation" for the LR grid, "test" for the reported cells
    extra: tuple[str, ...] = field(default=())
    sharpness_images: int = 256

    def overrides(self) -> list[str]:
        return [*COMMON, *ARMS[self.arm], *self.extra, f"data.holdout={self.holdout}",
                f"train.global_batch={self.batch}", f"train.seed={self.seed}",
                f"train.epochs={self.epochs:g}", f"schedule.warmup_epochs={self.epochs / 6:g}",
                f"optim.lr={self.lr:g}"]

    @property
    def key(self) -> str:
        text = "\n".join([self.arm, *self.overrides(), f"sharpness:{self.sharpness_images}"])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_and_measure(run: Run, cache: Path) -> dict[str, Any]:
    """Train one run (in a worker process), measure it, cache and return its record."""
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
    log = (cache / "logs" / f"{run.key}.log")
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
                # a grid LR that diverges is a result of the grid: it fits nothing
                summary = {"finished": True, "steps": 0, "train_time_s": 0.0, "final_eval": {
                    "top1": 0.0, "train_top1": 0.0}}
            if not summary["finished"]:  # a Ctrl-C stops a run with a checkpoint: not a result
                raise RuntimeError(f"run {run.key} stopped at step {summary['steps']}: "
                                   f"{summary['stop_reason']}")
            final = summary["final_eval"]
            record: dict[str, Any] = {
                "arm": run.arm, "batch": run.batch, "seed": run.seed, "epochs": run.epochs,
                "lr": run.lr, "holdout": run.holdout, "steps": summary["steps"],
                "top1": final["top1"], "train_top1": final["train_top1"],
                "gap": final["train_top1"] - final["top1"],
                "train_s": summary["train_time_s"]}
            if run.holdout == "test":
                record["pgd_steps"] = cfg.eval.pgd_steps
                record["pgd_top1"] = final[f"pgd{cfg.eval.pgd_steps}_top1"]
                measured = run_evaluation(cfg, run_dir, sharpness_images=run.sharpness_images)
                record.update({k: measured["sharpness"][k] for k in
                               ("hessian_top_eigenvalue", "keskar_sharpness", "increase")})
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


def cached(run: Run, cache: Path) -> dict[str, Any] | None:
    path = cache / f"{run.key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_all(runs: list[Run], cache: Path, workers: int) -> tuple[list[dict[str, Any]], int]:
    """Records of `runs`, training those not in the cache `workers` at a time, longest first.
    Returns the records (in the order of `runs`) and how many were trained."""
    records = {run.key: cached(run, cache) for run in runs}
    missing = sorted((run for run in runs if records[run.key] is None),
                     key=lambda r: -(r.epochs * (2 if r.arm.startswith("conadv") else 1)))
    if missing:
        context = multiprocessing.get_context("spawn")  # no forked torch state
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(train_and_measure, run, cache): run for run in missing}
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:  # the runs not started yet are dropped
                    pool.shutdown(wait=False, cancel_futures=True)
                record = future.result()
                records[record["key"]] = record
                print(f"{record['arm']:13s} batch {record['batch']:4d} seed {record['seed']} "
                      f"lr {record['lr']:<5g} {record['holdout']:10s}: top-1 "
                      f"{record['top1']:6.2f}  train {record['train_top1']:6.2f}  "
                      f"({record['wall_s']:.0f} s)", flush=True)
    return [records[run.key] for run in runs], len(missing)


def choose_lr(records: list[dict[str, Any]], fit: float = 99.5) -> float:
    """Among the grid's LRs whose run fits the training split (train top-1 >= `fit`), the one
    with the highest validation top-1, ties to the smaller LR; if none fits, the best of all
    (the verdict then reports that the fit was not matched)."""
    fitting = [r for r in records if r["train_top1"] >= fit] or records
    return max(fitting, key=lambda r: (r["top1"], -r["lr"]))["lr"]


# ---------------------------------------------------------------------------- statistics
def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard error and the half-width of the 95 % t confidence interval."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    se = statistics.stdev(values) / n ** 0.5
    return mean, se, float(t.ppf(0.975, n - 1)) * se


def paired(first: list[dict[str, Any]], second: list[dict[str, Any]],
           key: str = "top1") -> list[float]:
    """first - second for the seeds both have."""
    theirs = {r["seed"]: r[key] for r in second}
    return [r[key] - theirs[r["seed"]] for r in first if r["seed"] in theirs]


def decide(small_vanilla: list[dict[str, Any]], small_conadv: list[dict[str, Any]],
           large_vanilla: list[dict[str, Any]], large_conadv: list[dict[str, Any]],
           fit: float = 99.5) -> dict[str, Any]:
    """The README's decision rules at one large batch. A gap G exists when large-batch vanilla
    fits (mean train top-1 >= `fit`) and the small batch beats it by max(0.5 points, 3 paired
    standard errors); then ConAdv helps when its paired difference at the large batch has a
    95 % CI above 0 and exceeds its difference at the small batch, does not help when the CI
    lies below G / 4, and is inconclusive otherwise."""
    fits = statistics.mean(r["train_top1"] for r in large_vanilla) >= fit
    gap, gap_se, _ = mean_ci(paired(small_vanilla, large_vanilla))
    conadv, _, half = mean_ci(paired(large_conadv, large_vanilla))
    conadv_small = statistics.mean(paired(small_conadv, small_vanilla))
    result = {"fits": fits, "gap": gap, "gap_se": gap_se,
              "gap_pairs": len(paired(small_vanilla, large_vanilla)),
              "large_vanilla_train_top1": statistics.mean(r["train_top1"] for r in large_vanilla),
              "small_vanilla_train_top1": statistics.mean(r["train_top1"] for r in small_vanilla),
              "conadv_minus_vanilla": conadv, "ci95": [conadv - half, conadv + half],
              "conadv_minus_vanilla_small": conadv_small}
    if not (fits and gap_se == gap_se and gap >= max(0.5, 3 * gap_se)):  # NaN: one pair
        reason = ("large-batch vanilla does not fit the training split" if not fits else
                  "the small batch does not beat it by max(0.5, 3 SE)")
        return {**result, "gap_exists": False, "verdict": f"no gap at matched fit ({reason})"}
    if conadv - half > 0 and conadv > conadv_small:
        verdict = "ConAdv helps"
    elif conadv + half < gap / 4:
        verdict = "ConAdv does not help"
    else:
        verdict = "inconclusive"
    return {**result, "gap_exists": True, "verdict": verdict}


# ---------------------------------------------------------------------------- the study
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


def finished_runs(cache: Path) -> set[Path]:
    return {p for p in cache.glob("*.json") if len(p.stem) == 16}


def reported_runs(design: Design, lrs: dict[int, float], long_factor: float | None) -> list[Run]:
    runs = []
    for batch in design.batches:
        arms = ["vanilla", "conadv_tau1"]
        if batch == design.largest:
            arms.append("conadv_tau0")
            if long_factor is not None:
                arms.append("vanilla_long")
        for arm in arms:
            epochs = design.epochs[batch] * (long_factor if arm == "vanilla_long" else 1)
            runs += [Run(arm, batch, seed, round(epochs, 2), lrs[batch], "test", design.extra,
                         design.sharpness_images)
                     for seed in range(design.seeds[batch])]
    return runs


def long_factor_of(records: list[dict[str, Any]], batch: int, cache: Path) -> float:
    """ConAdv's training time over vanilla's at `batch` (medians over seeds of the trainer's
    train_time_s, which includes the final evaluation both arms pay alike, so the ratio leans
    towards 1), to 0.1. Measured once and kept in the cache: a run trained again after an
    interruption must not move it (and with it every vanilla_long run's config)."""
    kept = cache / "long_factor.json"
    if kept.is_file():
        return json.loads(kept.read_text())["factor"]

    def median(arm: str) -> float:
        return statistics.median(r["train_s"] for r in records
                                 if r["arm"] == arm and r["batch"] == batch)
    factor = round(median("conadv_tau1") / median("vanilla"), 1)
    kept.write_text(json.dumps({"factor": factor, "batch": batch}) + "\n")
    return factor


def cells_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean +- standard deviation of every metric per (batch, arm)."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["batch"], record["arm"]), []).append(record)
    cells = []
    for (batch, arm), group in sorted(groups.items(),
                                      key=lambda kv: (kv[0][0], list(ARMS).index(kv[0][1]))):
        cell = {"batch": batch, "arm": arm, "seeds": len(group), "epochs": group[0]["epochs"],
                "steps": group[0]["steps"], "lr": group[0]["lr"]}
        for key in ("top1", "train_top1", "gap", "pgd_top1", "hessian_top_eigenvalue",
                    "keskar_sharpness", "train_s"):
            values = [r[key] for r in group]
            cell[key] = [statistics.mean(values),
                         statistics.stdev(values) if len(values) > 1 else 0.0]
        cells.append(cell)
    return cells


def comparisons(design: Design, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired differences (same seed) of test top-1 and sharpness, with 95 % CIs."""
    def of(batch: int, arm: str) -> list[dict[str, Any]]:
        return [r for r in records if r["batch"] == batch and r["arm"] == arm]

    pairs = [(b, "conadv_tau1", b, "vanilla") for b in design.batches]
    pairs += [(design.small, "vanilla", b, "vanilla") for b in design.large]
    big = design.largest
    pairs += [(big, "conadv_tau0", big, "vanilla"), (big, "vanilla_long", big, "vanilla"),
              (big, "conadv_tau1", big, "vanilla_long")]
    rows = []
    for batch_a, arm_a, batch_b, arm_b in pairs:
        first, second = of(batch_a, arm_a), of(batch_b, arm_b)
        if not first or not second:
            continue
        row = {"a": f"{arm_a} @ {batch_a}", "b": f"{arm_b} @ {batch_b}"}
        for key in ("top1", "hessian_top_eigenvalue", "keskar_sharpness"):
            diffs = paired(first, second, key)
            mean, _, half = mean_ci(diffs)
            row[key] = {"mean": mean, "ci95": [mean - half, mean + half], "n": len(diffs)}
        rows.append(row)
    return rows


def pgd_label(report: dict[str, Any]) -> str:
    return f"PGD-{report['runs'][0].get('pgd_steps', 10)}"


def write_table(report: dict[str, Any], path: Path) -> None:
    fmt = "{0:.2f} ± {1:.2f}".format
    pgd = pgd_label(report)
    invocations = report["invocations"]
    lines = ["# Matched-fit study on MNIST", "",
             f"Made by `{report['command']}` ({report['machine']['cpu']}, "
             f"{report['machine']['cores']} cores) in {len(invocations)} invocation(s) of "
             + ", ".join(f"{i['wall_s'] / 60:.1f} min ({i['trained']} runs trained"
                         f"{', interrupted' if i.get('interrupted') else ''})"
                         for i in invocations)
             + f": {sum(i['wall_s'] for i in invocations) / 60:.1f} minutes in all. Mean ± "
             "standard deviation over seeds. Train top-1: the training split's "
             f"{report['train_images']} images in eval mode; gap = train - test; λ_max: the "
             "training loss's largest Hessian eigenvalue and Keskar's sharpness (rho = 5e-4) on "
             f"{report['design']['sharpness_images']} training images; {pgd} at eps 8/255.", "",
             "Learning rates chosen on the validation split (vanilla, seed 0; peak LR at batch "
             "64, scaled linearly; validation top-1 / train top-1; chosen: the best that fits "
             "the training split):", ""]
    for batch, grid in report["lr_grid"].items():
        shown = ", ".join(f"{g['lr']:g} → {g['top1']:.1f} / {g['train_top1']:.2f} %"
                          for g in grid)
        fits = any(g["train_top1"] >= 99.5 for g in grid)
        lines.append(f"- batch {batch}: {shown}; chosen {report['lrs'][batch]:g}"
                     + ("" if fits else " (none fits: the best validation top-1)"))
    lines += ["", f"Vanilla at ConAdv's compute trains {report['long_factor']:g}x the epochs "
              "(ConAdv's measured training time over vanilla's at the largest batch).", "",
              "| batch | arm | epochs | steps | test top-1 % | train top-1 % | gap | "
              f"{pgd} % | λ_max | Keskar sharpness | train s |", "|---" * 11 + "|"]
    for c in report["cells"]:
        lines.append(f"| {c['batch']} | {c['arm']} | {c['epochs']:g} | {c['steps']} | "
                     + " | ".join(fmt(*c[k]) for k in (
                         "top1", "train_top1", "gap", "pgd_top1", "hessian_top_eigenvalue",
                         "keskar_sharpness")) + f" | {c['train_s'][0]:.0f} |")
    lines += ["", "Paired differences (a - b, same seeds) with 95 % confidence intervals:", "",
              "| a | b | n | test top-1 points | λ_max | Keskar sharpness |", "|---" * 6 + "|"]
    for row in report["comparisons"]:
        shown = [f"{row[k]['mean']:+.2f} [{row[k]['ci95'][0]:+.2f}, {row[k]['ci95'][1]:+.2f}]"
                 for k in ("top1", "hessian_top_eigenvalue", "keskar_sharpness")]
        lines.append(f"| {row['a']} | {row['b']} | {row['top1']['n']} | {' | '.join(shown)} |")
    lines += ["", "Verdicts under the README's rules:", ""]
    for batch, d in report["verdicts"].items():
        lines.append(f"- batch {batch}: **{d['verdict']}** (train top-1 of vanilla "
                     f"{d['large_vanilla_train_top1']:.2f} %, at batch "
                     f"{report['design']['small']} {d['small_vanilla_train_top1']:.2f} %; gap G "
                     f"= {d['gap']:.2f} ± {d['gap_se']:.2f} SE points, paired over "
                     f"{d['gap_pairs']} seeds; ConAdv - vanilla = "
                     f"{d['conadv_minus_vanilla']:+.2f}, 95 % CI [{d['ci95'][0]:+.2f}, "
                     f"{d['ci95'][1]:+.2f}]; at batch {report['design']['small']}: "
                     f"{d['conadv_minus_vanilla_small']:+.2f})")
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("top1", "test top-1 (%)"), ("hessian_top_eigenvalue", "λ_max of the training loss"),
              ("pgd_top1", f"{pgd_label(report)} top-1 (%)")]
    for ax, (key, label) in zip(axes, panels):
        for i, arm in enumerate(ARMS):
            mine = [c for c in report["cells"] if c["arm"] == arm]
            if mine:
                ax.errorbar([c["batch"] for c in mine], [c[key][0] for c in mine],
                            yerr=[c[key][1] for c in mine], marker="o", capsize=3,
                            label=arm, color=f"C{i}", linestyle="-" if len(mine) > 1 else "")
        ax.set_xscale("log")
        ax.set_xlabel("global batch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fitted = all(d["fits"] for d in report["verdicts"].values())
    fig.suptitle("MNIST, " + ("large-batch vanilla fits the training split" if fitted else
                              "large-batch vanilla does NOT fit the training split")
                 + " (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".study-cache"),
                        help="where finished runs are kept (a rerun trains only the missing)")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at a time")
    parser.add_argument("--quick", action="store_true",
                        help="two batches, two seeds, a fraction of an epoch: checks the "
                             "pipeline, not the science")
    return parser.parse_args(argv)


def run_phases(design: Design, cache: Path, workers: int) -> tuple:
    """The study's runs, trained where the cache lacks them: (reported records, grid records,
    LR per batch, the compute factor of vanilla_long, runs trained)."""
    # 1. each batch's LR, on the validation split
    grid = [Run("vanilla", batch, 0, design.epochs[batch], lr, "validation", design.extra,
                design.sharpness_images)
            for batch in design.batches for lr in design.lr_grid[batch]]
    grid_records, trained = run_all(grid, cache, workers)
    lrs = {batch: choose_lr([r for r in grid_records if r["batch"] == batch])
           for batch in design.batches}
    # 2. the reported arms, on the test split; 3. vanilla at ConAdv's measured compute
    records, count = run_all(reported_runs(design, lrs, None), cache, workers)
    trained += count
    factor = long_factor_of(records, design.largest, cache)
    records, count = run_all(reported_runs(design, lrs, factor), cache, workers)
    return records, grid_records, lrs, factor, trained + count


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    design = QUICK if args.quick else FULL
    cache = args.cache / ("quick" if args.quick else "full")
    cache.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.matched_fit_study " + " ".join(
        sys.argv[1:] if argv is None else argv)
    started, known = time.perf_counter(), finished_runs(cache)
    try:
        records, grid_records, lrs, factor, trained = run_phases(design, cache, args.workers)
    except KeyboardInterrupt:
        record_invocation(cache, time.perf_counter() - started,
                          len(finished_runs(cache) - known), interrupted=True)
        raise
    wall = time.perf_counter() - started
    invocations = record_invocation(cache, wall, trained)

    def of(batch: int, arm: str) -> list[dict[str, Any]]:
        return [r for r in records if r["batch"] == batch and r["arm"] == arm]

    verdicts = {batch: decide(of(design.small, "vanilla"), of(design.small, "conadv_tau1"),
                              of(batch, "vanilla"), of(batch, "conadv_tau1"))
                for batch in design.large}
    report = {"command": command, "wall_s": wall, "trained": trained,
              "invocations": invocations,
              "train_images": next(int(o.split("=")[1]) for o in [*COMMON, *design.extra][::-1]
                                   if o.startswith("train.eval_train_images=")),
              "machine": machine_info(), "design": {
                  "small": design.small, "large": list(design.large), "epochs": design.epochs,
                  "seeds": design.seeds, "lr_grid": design.lr_grid, "common": COMMON,
                  "extra": list(design.extra), "sharpness_images": design.sharpness_images,
                  "arms": ARMS},
              "lr_grid": {b: [{"lr": r["lr"], "top1": r["top1"], "train_top1": r["train_top1"]}
                              for r in grid_records if r["batch"] == b]
                          for b in design.batches},
              "lrs": lrs, "long_factor": factor, "cells": cells_of(records),
              "comparisons": comparisons(design, records), "verdicts": verdicts,
              "runs": records}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matched_fit_study.json").write_text(json.dumps(report, indent=1) + "\n")
    write_table(report, args.out / "matched_fit_study.md")
    plot(report, args.out / "matched_fit_study.png")
    print(f"wrote {args.out}/matched_fit_study.{{md,json,png}}: {trained} runs trained in "
          f"{wall / 60:.1f} minutes")
    for batch, d in verdicts.items():
        print(f"batch {batch}: {d['verdict']}")
    return report


if __name__ == "__main__":
    main()
