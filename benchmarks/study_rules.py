"""The matched-fit study's decision rules, as code: the statistics (Student's t, Welch's t,
paired differences, log ratios) and the verdicts docs/study_rules.md states in words. They were
written, with that document, before the study's first run; tests/test_study_rules.py checks
each verdict on made-up runs whose answer is known.

A record is one run's dict (as benchmarks.study_runs writes it): "seed", "top1",
"train_top1" and, where measured, "sharp_..." values.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

Records = list[dict[str, Any]]

FIT = 99.5  # a cell fits when its runs' mean top-1 on the whole training split is at least this
# the smallest difference the study calls "no effect" on: with 10 seeds per arm paired at one
# batch (seed-to-seed sd 0.61 points of a same-seed difference), the 95 % interval's upper end
# falls below 0.6 points with power 0.8 when the truth is 0 (benchmarks/study_power.py)
MARGIN = 0.6


@dataclass(frozen=True)
class Difference:
    """a - b with its 95 % interval; `n` pairs, or the two groups' sizes for Welch."""

    mean: float
    se: float
    low: float
    high: float
    n: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def shown(self, digits: int = 2) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard error and the half-width of the 95 % Student t interval."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.mean(values)
    if n < 2:
        return mean, math.nan, math.nan
    se = statistics.stdev(values) / n ** 0.5
    return mean, se, float(t.ppf(0.975, n - 1)) * se


def paired_values(a: Records, b: Records, key: str) -> list[tuple[float, float]]:
    """(a, b) values of the seeds both have, in a's order."""
    theirs = {r["seed"]: r[key] for r in b}
    return [(r[key], theirs[r["seed"]]) for r in a if r["seed"] in theirs]


def paired(a: Records, b: Records, key: str = "top1") -> Difference:
    """a - b paired by seed (the same batch and seed: the pairing is real)."""
    diffs = [x - y for x, y in paired_values(a, b, key)]
    mean, se, half = mean_ci(diffs)
    return Difference(mean, se, mean - half, mean + half, (len(diffs),))


def log_ratio(a: Records, b: Records, key: str) -> Difference | None:
    """log(a / b) paired by seed (for measures one seed can dominate, like lambda_max); None
    when a value is not positive."""
    pairs = paired_values(a, b, key)
    if any(x <= 0 or y <= 0 for x, y in pairs):
        return None
    diffs = [math.log(x / y) for x, y in pairs]
    mean, se, half = mean_ci(diffs)
    return Difference(mean, se, mean - half, mean + half, (len(diffs),))


def log_welch(a: Records, b: Records, key: str) -> Difference | None:
    """mean log(a) - mean log(b), unpaired (Welch); None when a value is not positive."""
    if any(r[key] <= 0 for r in (*a, *b)):
        return None
    return welch([{key: math.log(r[key])} for r in a], [{key: math.log(r[key])} for r in b],
                 key)


def welch(a: Records, b: Records, key: str = "top1") -> Difference:
    """mean(a) - mean(b), unpaired, with Welch's interval (different batches: no pairing)."""
    from scipy.stats import t

    xs, ys = [r[key] for r in a], [r[key] for r in b]
    mean = statistics.mean(xs) - statistics.mean(ys)
    if len(xs) < 2 or len(ys) < 2:
        return Difference(mean, math.nan, math.nan, math.nan, (len(xs), len(ys)))
    va, vb = statistics.variance(xs) / len(xs), statistics.variance(ys) / len(ys)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(mean, 0.0, mean, mean, (len(xs), len(ys)))
    df = (va + vb) ** 2 / (va ** 2 / (len(xs) - 1) + vb ** 2 / (len(ys) - 1))
    half = float(t.ppf(0.975, df)) * se
    return Difference(mean, se, mean - half, mean + half, (len(xs), len(ys)))


def train_fit(records: Records) -> float:
    """The cell's mean top-1 on the whole training split."""
    return statistics.mean(r["train_top1"] for r in records)


def fits(records: Records) -> bool:
    """Whether the cell fits the training split by the study's one criterion."""
    return train_fit(records) >= FIT


def _unknown(d: Difference) -> bool:
    return math.isnan(d.low)


# ---------------------------------------------------------------------------- the rules
def gap_verdict(small: Records, large: Records) -> dict[str, Any]:
    """Rule 1: is there a gap at matched fit? Batch-small vanilla minus batch-large vanilla,
    Welch; a gap when both cells fit and the interval lies above 0."""
    d = welch(small, large)
    verdict = _at_matched_fit(d, fits(small) and fits(large), "gap",
                              f"no gap of {MARGIN} points or more")
    return {"verdict": verdict, "difference": d.as_dict(), "shown": d.shown()}


def conadv_verdict(vanilla: Records, conadv: Records) -> dict[str, Any]:
    """Rule 2: at the large batch, both trained to fit, ConAdv - vanilla paired by seed:
    helps when the interval lies above 0, does not help when it lies below MARGIN."""
    d = paired(conadv, vanilla)
    verdict = _at_matched_fit(d, fits(vanilla) and fits(conadv), "ConAdv helps",
                              f"ConAdv does not help by {MARGIN} points or more")
    if verdict.startswith("ConAdv does not help") and d.high < 0:
        verdict += " (ConAdv worse)"
    return {"verdict": verdict, "difference": d.as_dict(), "shown": d.shown()}


def _at_matched_fit(d: Difference, matched: bool, above_zero: str, below_margin: str) -> str:
    if not matched:
        return "not at matched fit"
    if _unknown(d):
        return "too few seeds"
    if d.low > 0:
        return above_zero
    return below_margin if d.high < MARGIN else "inconclusive"


def equal_compute_verdict(conadv: Records, longer: Records) -> dict[str, Any]:
    """Rule 3: ConAdv against vanilla trained for the same counted compute, paired by seed."""
    d = paired(conadv, longer)
    if _unknown(d):
        verdict = "too few seeds"
    elif d.low > 0:
        verdict = "ConAdv beats training longer"
    elif d.high < 0:
        verdict = "training longer does more"
    elif -MARGIN < d.low and d.high < MARGIN:
        verdict = f"equal within {MARGIN} points"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "difference": d.as_dict(), "shown": d.shown()}


def sharpness_verdict(a: Records, b: Records, paired_by_seed: bool = True) -> dict[str, Any]:
    """Rule 4: a against b, only when both fit: lambda_max as a log ratio (one seed can
    dominate its mean), the box measure's curvature rest (its first-order term removed) as a
    difference; each flatter or sharper when its interval excludes 0. Paired by seed within a
    batch, Welch across batches. Medians are reported beside."""
    result: dict[str, Any] = {"matched_fit": fits(a) and fits(b), "medians": {},
                              "paired_by_seed": paired_by_seed}
    for key in ("sharp_hessian_top_eigenvalue", "sharp_second_order", "sharp_first_order"):
        result["medians"][key] = [statistics.median(r[key] for r in a),
                                  statistics.median(r[key] for r in b)]
    if not result["matched_fit"]:
        result["verdict"] = "not at matched fit: not compared"
        return result
    lam, rest = "sharp_hessian_top_eigenvalue", "sharp_second_order"
    ratio = log_ratio(a, b, lam) if paired_by_seed else log_welch(a, b, lam)
    difference = paired(a, b, rest) if paired_by_seed else welch(a, b, rest)
    result["lambda_log_ratio"] = ratio.as_dict() if ratio else None
    result["second_order"] = difference.as_dict()
    result["lambda_verdict"] = _direction(ratio) if ratio else "not positive in every run"
    result["second_order_verdict"] = _direction(difference)
    result["verdict"] = f"lambda_max {result['lambda_verdict']}, " \
                        f"curvature rest {result['second_order_verdict']}"
    return result


def _direction(d: Difference) -> str:
    if _unknown(d):
        return "too few seeds"
    return "flatter" if d.high < 0 else "sharper" if d.low > 0 else "no difference shown"


def seed_verdict(published: Records, reruns: Records, fresh: Records) -> dict[str, Any]:
    """Rule 6: fresh seeds of the first study's cell against its seeds 0-9 (Welch, fresh -
    those seeds), on test and training-split top-1: the seeds 0-9 are unusual when either
    interval excludes 0. Against the published records when today's runs reproduce them
    exactly (every rerun of seeds 0-9), else against the reruns, made where the fresh seeds
    were."""
    keys = ("top1", "train_top1", "pgd_top1")
    theirs = {r["seed"]: r for r in published}
    reproduces = bool(reruns) and all(r["seed"] in theirs and all(
        r[k] == theirs[r["seed"]][k] for k in keys) for r in reruns)
    baseline = published if reproduces else reruns
    test, train = welch(fresh, baseline, "top1"), welch(fresh, baseline, "train_top1")
    if _unknown(test) or _unknown(train):
        verdict = "too few seeds"
    elif test.low > 0 or test.high < 0 or train.low > 0 or train.high < 0:
        verdict = "seeds 0-9 differ from fresh seeds"
    else:
        verdict = "no difference between seeds 0-9 and fresh seeds"
    drift = {k: paired(reruns, published, k).as_dict() for k in keys} if reruns else {}
    return {"verdict": verdict, "code_reproduces_published": reproduces,
            "compared_with": "published records" if reproduces else "reruns of seeds 0-9",
            "test": test.as_dict(), "train": train.as_dict(), "drift": drift,
            "shown": {"top1": test.shown(), "train_top1": train.shown()}}
