"""The matched-fit study on real MNIST at 28 px: when vanilla and ConAdv are each trained at a
large batch until they fit the training split, and vanilla is also given ConAdv's counted
compute, does ConAdv close part of the gap to a small batch, and is the minimum it finds
flatter? The design and the decision rules are in docs/study_rules.md, committed before the
first run; the rules as code are benchmarks/study_rules.py.

Phases (every run cached; an interrupted study resumes with the runs it is missing):

1. tuning on the validation split with seed 0: vanilla's peak LR and epochs at the small and the
   large batch (the shortest epoch count of the grid at which some LR fits; among those LRs the
   best validation top-1), then ConAdv's epochs at the large batch (vanilla's LR, the shortest
   epoch count at which it fits), and the equal-compute vanilla's epochs (ConAdv's, times
   ConAdv's counted forward equivalents per step over vanilla's);
2. the reported runs on the test split, seeds 1-10: vanilla at the small batch, and vanilla,
   ConAdv and the equal-compute vanilla at the large batch, with sharpness;
3. the seed check (finding 6 of the first study): that study's vanilla cell at batch 750 rerun
   with its seed 0 (must reproduce the published record) and with fresh seeds 10-19.

    python -m benchmarks.matched_fit_study --out docs/results          # `make study`
    python -m benchmarks.matched_fit_study --quick --out /tmp/study    # checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import study_rules as rules
from benchmarks.common import machine_info, mean_std
from benchmarks.study_runs import Run, finished_runs, record_invocation, run_all

COMMON = (
    "data.name=mnist", "data.min_crop_scale=1.0", "data.hflip=false", "data.workers=0",
    "model.arch=cifar_resnet", "model.cifar_width=4", "optim.name=lars",
    "optim.scale_rule=linear", "optim.base_batch=64", "optim.weight_decay=5e-5",
    "schedule.decay=poly", "schedule.poly_power=2", "train.device=cpu",
    "train.max_per_device_batch=75", "train.eval_every_epochs=0",
    "train.eval_train_images=3000", "eval.robust=true", "eval.epsilon=0.03137254901960784",
    "eval.step_size=0.00784313725490196", "log.progress=false", "log.tensorboard=false",
    "checkpoint.resume=none", "checkpoint.keep_last=1", "checkpoint.every_steps=1000000",
)
ARMS = {
    "vanilla": ("adv.enabled=false",),
    "conadv_tau1": ("adv.enabled=true", "adv.tau=1"),
    "vanilla_equal": ("adv.enabled=false",),  # vanilla trained for ConAdv's counted compute
}
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
FIRST_STUDY = RESULTS / "first_matched_fit_study.json"


@dataclass(frozen=True)
class Design:
    image_size: int
    small: int
    large: int
    small_epochs: tuple[float, ...]  # epoch grid, shortest first
    small_lrs: tuple[float, ...]  # peak LR at batch 64, scaled linearly
    large_epochs: tuple[float, ...]
    large_lrs: tuple[float, ...]
    conadv_epochs: tuple[float, ...]
    seeds: tuple[int, ...]  # the reported seeds; seed 0 tunes
    rerun_seeds: tuple[int, ...]  # the seed check: the first study's seeds, rerun today
    fresh_seeds: tuple[int, ...]  # and seeds it never used
    sharpness_images: int = 256
    extra: tuple[str, ...] = field(default=())  # overrides of every run

    def settings(self, arm: str) -> tuple[str, ...]:
        size = (f"data.image_size={self.image_size}", f"data.eval_resize={self.image_size}")
        return (*COMMON, *size, *ARMS[arm], *self.extra)


FULL = Design(image_size=28, small=75, large=750, small_epochs=(20, 40), small_lrs=(4, 8, 16),
              large_epochs=(30, 60), large_lrs=(0.5, 1, 2), conadv_epochs=(30, 60, 90),
              seeds=tuple(range(1, 11)), rerun_seeds=tuple(range(10)),
              fresh_seeds=tuple(range(10, 20)))
QUICK = Design(image_size=12, small=75, large=150, small_epochs=(1,), small_lrs=(0.5,),
               large_epochs=(1, 2), large_lrs=(1, 2), conadv_epochs=(1, 2), seeds=(1, 2),
               rerun_seeds=(0,), fresh_seeds=(10,), sharpness_images=32,
               extra=("train.max_steps=3", "train.eval_train_images=150", "eval.pgd_steps=2"))


# ---------------------------------------------------------------------------- phase 1: tuning
@dataclass
class Tuned:
    """What tuning chose for one arm at one batch, and the runs it saw."""

    lr: float
    epochs: float
    fits: bool | None  # None: not tuned for fit (the equal-compute arm)
    grid: list[dict[str, Any]]


def choose(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Among the runs that fit the training split, the best validation top-1 (ties to the
    smaller LR); None when none fits."""
    fitting = [r for r in records if r["train_top1"] >= rules.FIT]
    return max(fitting, key=lambda r: (r["top1"], -r["lr"])) if fitting else None


def tune_vanilla(design: Design, cache: Path, workers: int) -> tuple[dict[int, Tuned], int]:
    """Each batch's LR and epochs: the shortest grid epochs at which some LR fits."""
    grids = {design.small: (design.small_epochs, design.small_lrs),
             design.large: (design.large_epochs, design.large_lrs)}
    tuned: dict[int, Tuned] = {}
    seen: dict[int, list[dict[str, Any]]] = {batch: [] for batch in grids}
    trained = 0
    for round_ in range(max(len(epochs) for epochs, _ in grids.values())):
        runs = [Run("vanilla", batch, 0, epochs[round_], lr, "validation",
                    design.settings("vanilla"))
                for batch, (epochs, lrs) in grids.items()
                if batch not in tuned and round_ < len(epochs) for lr in lrs]
        records, count = run_all(runs, cache, workers)
        trained += count
        for batch, (epochs, _) in grids.items():
            if batch in tuned:
                continue
            mine = [r for r in records if r["batch"] == batch]
            seen[batch] += mine
            best = choose(mine)
            if best is not None:
                tuned[batch] = Tuned(best["lr"], best["epochs"], True, seen[batch])
            elif round_ == len(epochs) - 1:  # none fits: the best of the longest, flagged
                best = max(mine, key=lambda r: (r["train_top1"], r["top1"], -r["lr"]))
                tuned[batch] = Tuned(best["lr"], best["epochs"], False, seen[batch])
    return tuned, trained


def tune_conadv(design: Design, lr: float, cache: Path, workers: int,
                fillers: list[list[Run]]) -> tuple[Tuned, int]:
    """ConAdv's epochs at the large batch with vanilla's LR: the shortest that fits. Each
    round also trains a list of `fillers` (runs that are known already) beside it."""
    seen: list[dict[str, Any]] = []
    trained = 0
    for round_, epochs in enumerate(design.conadv_epochs):
        run = Run("conadv_tau1", design.large, 0, epochs, lr, "validation",
                  design.settings("conadv_tau1"))
        extra = fillers[round_] if round_ < len(fillers) else []
        records, count = run_all([run, *extra], cache, workers)
        trained += count
        seen.append(records[0])
        if records[0]["train_top1"] >= rules.FIT:
            return Tuned(lr, epochs, True, seen), trained
    return Tuned(lr, design.conadv_epochs[-1], False, seen), trained


def compute_ratio(conadv: dict[str, Any], vanilla: dict[str, Any]) -> float:
    """ConAdv's counted forward equivalents per step over vanilla's at the same batch."""
    if not (conadv["steps"] and vanilla["steps"]):
        raise RuntimeError("the tuning run chosen for ConAdv or vanilla at the large batch "
                           "diverged: no compute to match (widen the grid)")
    return (conadv["forward_equivalents"] / conadv["steps"]) / (
        vanilla["forward_equivalents"] / vanilla["steps"])


# ---------------------------------------------------------------------------- phases 2 and 3
def reported(design: Design, arm: str, batch: int, tuned: Tuned) -> list[Run]:
    return [Run(arm, batch, seed, tuned.epochs, tuned.lr, "test", design.settings(arm),
                design.sharpness_images) for seed in design.seeds]


def seed_check_runs(design: Design) -> list[Run]:
    """The first study's vanilla cell at batch 750 (its recorded overrides) with its seeds
    and fresh ones; no sharpness (the finding is about accuracy)."""
    published = _published_cell()
    first = published[0]
    own = ("data.holdout=", "train.global_batch=", "train.seed=", "train.epochs=",
           "schedule.warmup_epochs=", "optim.lr=")
    settings = tuple(o for o in first["overrides"] if not o.startswith(own)) + design.extra
    return [Run("first_vanilla", first["batch"], seed, first["epochs"], first["lr"], "test",
                settings) for seed in (*design.rerun_seeds, *design.fresh_seeds)]


def _published_cell() -> list[dict[str, Any]]:
    runs = json.loads(FIRST_STUDY.read_text())["runs"]
    return sorted((r for r in runs if r["arm"] == "vanilla" and r["batch"] == 750),
                  key=lambda r: r["seed"])


def run_phases(design: Design, cache: Path, workers: int) -> dict[str, Any]:
    vanilla, trained = tune_vanilla(design, cache, workers)
    small, large = vanilla[design.small], vanilla[design.large]
    vanilla_runs = (reported(design, "vanilla", design.small, small)
                    + reported(design, "vanilla", design.large, large))
    checks = seed_check_runs(design)
    conadv, count = tune_conadv(design, large.lr, cache, workers, [vanilla_runs, checks])
    trained += count
    ratio = compute_ratio(conadv.grid[-1], next(r for r in large.grid
                                                  if r["lr"] == large.lr
                                                  and r["epochs"] == large.epochs))
    equal = Tuned(large.lr, round(conadv.epochs * ratio, 2), None, [])
    runs = [*vanilla_runs, *reported(design, "conadv_tau1", design.large, conadv),
            *reported(design, "vanilla_equal", design.large, equal), *checks]
    records, count = run_all(runs, cache, workers)
    return {"tuned": {"vanilla_small": small, "vanilla_large": large, "conadv_large": conadv,
                      "equal_large": equal}, "compute_ratio": ratio,
            "records": [r for r in records if r["arm"] != "first_vanilla"],
            "seed_check": [r for r in records if r["arm"] == "first_vanilla"],
            "trained": trained + count}


# ---------------------------------------------------------------------------- the report
def decide(design: Design, records: list[dict[str, Any]]) -> dict[str, Any]:
    def of(arm: str, batch: int) -> list[dict[str, Any]]:
        return [r for r in records if r["arm"] == arm and r["batch"] == batch]

    small, vanilla = of("vanilla", design.small), of("vanilla", design.large)
    conadv, equal = of("conadv_tau1", design.large), of("vanilla_equal", design.large)
    gap, helps = rules.gap_verdict(small, vanilla), rules.conadv_verdict(vanilla, conadv)
    if gap["verdict"] == "gap" and helps["verdict"] == "ConAdv helps":
        helps["share_of_gap"] = helps["difference"]["mean"] / gap["difference"]["mean"]
    return {
        "gap": gap,
        "conadv": helps,
        "equal_compute": rules.equal_compute_verdict(conadv, equal),
        "remaining_gap": {"conadv": rules.welch(small, conadv).as_dict(),
                          "vanilla_equal": rules.welch(small, equal).as_dict()},
        "sharpness": {"conadv_vs_vanilla": rules.sharpness_verdict(conadv, vanilla),
                      "conadv_vs_vanilla_equal": rules.sharpness_verdict(conadv, equal),
                      "vanilla_vs_small": rules.sharpness_verdict(vanilla, small,
                                                                  paired_by_seed=False)},
    }


def cells_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (batch, arm): mean and standard deviation, and medians of the sharpness values."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["batch"], record["arm"]), []).append(record)
    cells = []
    for (batch, arm), group in sorted(groups.items(),
                                      key=lambda kv: (kv[0][0], list(ARMS).index(kv[0][1]))):
        cell = {"batch": batch, "arm": arm, "seeds": len(group), "epochs": group[0]["epochs"],
                "steps": group[0]["steps"], "lr": group[0]["lr"],
                "forward_equivalents": statistics.mean(r["forward_equivalents"] for r in group)}
        for key in ("top1", "train_top1", "gap", "pgd_top1", "train_s"):
            cell[key] = list(mean_std([r[key] for r in group]))
        for key in ("sharp_hessian_top_eigenvalue", "sharp_keskar_sharpness",
                    "sharp_first_order", "sharp_second_order"):
            cell[key] = statistics.median(r[key] for r in group)
        cells.append(cell)
    return cells


def seed_check_report(design: Design, checks: list[dict[str, Any]]) -> dict[str, Any]:
    published = _published_cell()
    reruns = [r for r in checks if r["seed"] in design.rerun_seeds]
    fresh = [r for r in checks if r["seed"] in design.fresh_seeds]
    return {"published": _summary(published), "reruns": _summary(reruns),
            "fresh": _summary(fresh), **rules.seed_verdict(published, reruns, fresh)}


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    def mean_sd(key: str) -> list[float]:
        return list(mean_std([r[key] for r in records]))

    return {"seeds": [r["seed"] for r in records], "top1": mean_sd("top1"),
            "train_top1": mean_sd("train_top1")}


def write_table(report: dict[str, Any], path: Path) -> None:
    design, tuned, verdicts = report["design"], report["tuned"], report["verdicts"]
    invocations = report["invocations"]
    small, large = design["small"], design["large"]
    lines = [
        f"# Matched-fit study on MNIST at {design['image_size']} px", "",
        f"Made by `{report['command']}` ({report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores) in {len(invocations)} invocation(s) of "
        + ", ".join(f"{i['wall_s'] / 60:.1f} min ({i['trained']} runs trained"
                    f"{', interrupted' if i.get('interrupted') else ''})" for i in invocations)
        + f": {sum(i['wall_s'] for i in invocations) / 60:.1f} minutes in all. Design and "
        "rules: [docs/study_rules.md](../study_rules.md), committed before the first run.", "",
        "## Tuning (validation split, seed 0)", "",
        "Validation top-1 / training-split top-1 per epochs and peak LR (at batch 64, scaled "
        "linearly):", ""]
    for name, t in tuned.items():
        shown = "; ".join(f"{g['epochs']:g} ep, lr {g['lr']:g} → {g['top1']:.1f} / "
                          f"{g['train_top1']:.2f} %" for g in t["grid"])
        lines.append(f"- {name}: chosen {t['epochs']:g} epochs, lr {t['lr']:g}"
                     + (" (none fits)" if t["fits"] is False else "")
                     + (f" ({shown})" if shown else
                        f" (ConAdv's epochs x {report['compute_ratio']:.4f}, its counted "
                        "forward equivalents per step over vanilla's)"))
    lines += ["", "## Cells (test split, seeds " + ", ".join(map(str, design["seeds"])) + ")",
              "", "Mean ± standard deviation over seeds; sharpness values are medians "
              f"(λ_max, Keskar, and the box's first-order term and curvature rest on "
              f"{design['sharpness_images']} training images, rho = 5e-4).", "",
              "| batch | arm | epochs | steps | forward equiv. | test top-1 % | train top-1 % "
              "| PGD % | λ_max | Keskar | first order | curvature rest | train s |",
              "|---" * 13 + "|"]
    fmt = "{0:.2f} ± {1:.2f}".format
    for c in report["cells"]:
        lines.append(
            f"| {c['batch']} | {c['arm']} | {c['epochs']:g} | {c['steps']} | "
            f"{c['forward_equivalents']:,.0f} | {fmt(*c['top1'])} | {fmt(*c['train_top1'])} | "
            f"{fmt(*c['pgd_top1'])} | {c['sharp_hessian_top_eigenvalue']:.3g} | "
            f"{c['sharp_keskar_sharpness']:.3g} | {c['sharp_first_order']:.3g} | "
            f"{c['sharp_second_order']:.3g} | {c['train_s'][0]:.0f} |")
    lines += ["", f"## Verdicts at batch {large} (rules 1-3)", "",
              "| rule | comparison | difference, points [95 % CI] | verdict |",
              "|---|---|---|---|",
              f"| 1 | vanilla @ {small} - vanilla @ {large} (Welch) | "
              f"{verdicts['gap']['shown']} | {verdicts['gap']['verdict']} |",
              f"| 2 | ConAdv - vanilla @ {large} (paired) | {verdicts['conadv']['shown']} | "
              f"{verdicts['conadv']['verdict']}"
              + (f" (closes {verdicts['conadv']['share_of_gap']:.0%} of the gap)"
                 if "share_of_gap" in verdicts["conadv"] else "") + " |",
              f"| 3 | ConAdv - vanilla at equal compute @ {large} (paired) | "
              f"{verdicts['equal_compute']['shown']} | {verdicts['equal_compute']['verdict']} |"]
    for arm, d in verdicts["remaining_gap"].items():
        shown = rules.Difference(**{**d, "n": tuple(d["n"])}).shown()
        lines.append(f"| - | vanilla @ {small} - {arm} @ {large} (Welch) | {shown} | "
                     "reported |")
    lines += ["", f"## Sharpness at matched fit (rule 4; paired by seed within batch {large}, "
              "Welch across batches)", "",
              "| comparison | matched fit | λ_max ratio [95 % CI] | curvature rest difference "
              "[95 % CI] | medians λ_max | medians curvature rest | verdict |",
              "|---|---|---|---|---|---|---|"]
    for name, s in verdicts["sharpness"].items():
        ratio = s.get("lambda_log_ratio")
        rest = s.get("second_order")
        shown_ratio = (f"{_exp(ratio['mean'])} [{_exp(ratio['low'])}, {_exp(ratio['high'])}]"
                       if ratio else "-")
        shown_rest = (f"{rest['mean']:+.3g} [{rest['low']:+.3g}, {rest['high']:+.3g}]"
                      if rest else "-")
        lam, sec = (s["medians"][k] for k in ("sharp_hessian_top_eigenvalue",
                                              "sharp_second_order"))
        lines.append(f"| {name.replace('_', ' ')} | {'yes' if s['matched_fit'] else 'no'} | "
                     f"{shown_ratio} | {shown_rest} | {lam[0]:.3g} vs {lam[1]:.3g} | "
                     f"{sec[0]:.3g} vs {sec[1]:.3g} | {s['verdict']} |")
    seed = report["seed_check"]
    lines += ["", "## Seed check (rule 6: the first study's vanilla cell at batch 750)", ""]
    for name, title in (("published", "published"), ("reruns", "rerun today"),
                        ("fresh", "fresh, today")):
        cell = seed[name]
        lines.append(f"- {title}, seeds {cell['seeds']}: test {fmt(*cell['top1'])}, train "
                     f"{fmt(*cell['train_top1'])} %")
    if seed["drift"]:
        lines.append("- today's runs minus the published records, same seeds (paired): "
                     + ", ".join(f"{k} {rules.Difference(**{**d, 'n': tuple(d['n'])}).shown()}"
                                 for k, d in seed["drift"].items())
                     + (" (reproduced exactly)" if seed["code_reproduces_published"] else ""))
    lines.append(f"- fresh - seeds 0-9 ({seed['compared_with']}, Welch): test "
                 f"{seed['shown']['top1']}, train {seed['shown']['train_top1']} points: "
                 f"**{seed['verdict']}**")
    path.write_text("\n".join(lines) + "\n")


def _exp(value: float) -> str:
    return f"{math.exp(value):.2f}x"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["runs"]
    cells = [(c["batch"], c["arm"]) for c in report["cells"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("top1", "test top-1 (%)", False),
              ("sharp_hessian_top_eigenvalue", "λ_max of the training loss", True),
              ("pgd_top1", "PGD top-1 (%)", False)]
    for ax, (key, label, log) in zip(axes, panels):
        for i, (batch, arm) in enumerate(cells):
            values = [r[key] for r in records if r["batch"] == batch and r["arm"] == arm]
            ax.plot([i] * len(values), values, "o", alpha=0.6, color=f"C{i}")
            ax.plot([i - 0.25, i + 0.25], [statistics.median(values)] * 2, color="k")
        ax.set_xticks(range(len(cells)), [f"{arm}\n@ {batch}" for batch, arm in cells],
                      fontsize=8)
        ax.set_ylabel(label)
        if log and all(r[key] > 0 for r in records):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("MNIST 28 px: every seed, and the median (black)")
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
                        help="two seeds and three steps a run: checks the pipeline, not the "
                             "science")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    design = QUICK if args.quick else FULL
    cache = args.cache / ("quick" if args.quick else "full28")
    cache.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.matched_fit_study " + " ".join(
        sys.argv[1:] if argv is None else argv)
    started, known = time.perf_counter(), finished_runs(cache)
    try:
        phases = run_phases(design, cache, args.workers)
    except BaseException:  # Ctrl-C or a failed run: its time still counts towards the study's
        record_invocation(cache, time.perf_counter() - started,
                          len(finished_runs(cache) - known), interrupted=True)
        raise
    wall = time.perf_counter() - started
    invocations = record_invocation(cache, wall, phases["trained"])
    records = phases["records"]
    report = {"command": command, "wall_s": wall, "trained": phases["trained"],
              "invocations": invocations, "machine": machine_info(),
              "design": {**asdict(design), "common": COMMON, "arms": ARMS, "fit": rules.FIT,
                         "margin": rules.MARGIN},
              "tuned": {name: asdict(t) for name, t in phases["tuned"].items()},
              "compute_ratio": phases["compute_ratio"], "cells": cells_of(records),
              "verdicts": decide(design, records),
              "seed_check": seed_check_report(design, phases["seed_check"]),
              "runs": records, "seed_check_runs": phases["seed_check"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matched_fit_study.json").write_text(json.dumps(report, indent=1) + "\n")
    write_table(report, args.out / "matched_fit_study.md")
    plot(report, args.out / "matched_fit_study.png")
    print(f"wrote {args.out}/matched_fit_study.{{md,json,png}}: {phases['trained']} runs "
          f"trained in {wall / 60:.1f} minutes")
    for name in ("gap", "conadv", "equal_compute"):
        print(f"{name}: {report['verdicts'][name]['verdict']}")
    return report


if __name__ == "__main__":
    main()
