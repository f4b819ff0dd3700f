"""How many seeds a matched-fit study needs: the power calculation, from the variance of runs
already made (docs/results/first_matched_fit_study.json by default).

For each large batch and arm it reads the seed-to-seed standard deviation of test top-1 and,
where the same seed ran vanilla at the same batch, the standard deviation of the paired
difference. From them, for each effect size that matters, the seeds per arm that give

- "helps": a two-sided test at alpha (Welch between arms, or paired by seed at one batch) that
  detects a true difference of delta with the given power;
- "does not help": a 95 % interval whose upper end lies below delta when the true difference is
  0, with the same power (one-sided bound, as in an equivalence test);

and, the other way round, the smallest difference each design can call at the seeds a budget
affords. t quantiles and the noncentral t give the exact power (scipy), not the normal
approximation.

    python -m benchmarks.study_power                       # table on stdout
    python -m benchmarks.study_power --json power.json     # and the numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

from scipy import stats

STUDY = Path(__file__).resolve().parents[1] / "docs" / "results" / "first_matched_fit_study.json"


def power_two_sample(n: int, sd: float, delta: float, alpha: float) -> float:
    """Power of a two-sided two-sample t test (equal n, equal sd) at true difference delta."""
    df = 2 * n - 2
    noncentrality = delta / (sd * (2 / n) ** 0.5)
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(1 - stats.nct.cdf(critical, df, noncentrality)
                 + stats.nct.cdf(-critical, df, noncentrality))


def power_paired(n: int, sd_difference: float, delta: float, alpha: float) -> float:
    """Power of a two-sided paired t test over n pairs at true mean difference delta."""
    df = n - 1
    noncentrality = delta / (sd_difference / n ** 0.5)
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(1 - stats.nct.cdf(critical, df, noncentrality)
                 + stats.nct.cdf(-critical, df, noncentrality))


def power_bound(n: int, se_of_one: float, df_of: int, delta: float, alpha: float) -> float:
    """Probability that the upper end of a two-sided (1 - alpha) interval lies below delta when
    the true difference is 0: what "does not help by delta" needs. `se_of_one`: the standard
    error of the difference with one seed per arm (or one pair)."""
    se = se_of_one / n ** 0.5
    critical = stats.t.ppf(1 - alpha / 2, df_of)
    # the estimate d-hat ~ t * se: need d-hat + critical * se < delta
    return float(stats.nct.cdf(delta / se - critical, df_of, 0.0))


def seeds_needed(power_of, target: float, most: int = 400) -> int | None:
    """The fewest seeds (>= 2) whose power reaches `target`, or None within `most`."""
    for n in range(2, most + 1):
        if power_of(n) >= target:
            return n
    return None


def spreads(runs: list[dict], reference: str = "vanilla") -> list[dict]:
    """Per (batch, arm): runs, mean and sd of test top-1; sd of the difference to the
    reference arm paired by seed at the same batch, and the pairs' correlation."""
    cells: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
    for run in runs:
        if run.get("holdout", "test") == "test":
            cells[(run["batch"], run["arm"])][run["seed"]] = run["top1"]
    rows = []
    for (batch, arm), by_seed in sorted(cells.items()):
        values = list(by_seed.values())
        row = {"batch": batch, "arm": arm, "runs": len(values),
               "mean": statistics.fmean(values),
               "sd": statistics.stdev(values) if len(values) > 1 else None}
        partner = cells.get((batch, reference), {})
        seeds = sorted(set(by_seed) & set(partner))
        if arm != reference and len(seeds) > 2:
            a, b = [by_seed[s] for s in seeds], [partner[s] for s in seeds]
            row.update(pairs=len(seeds),
                       sd_paired_difference=statistics.stdev([x - y for x, y in zip(a, b)]),
                       pair_correlation=statistics.correlation(a, b))
        rows.append(row)
    return rows


def designs(sd: float, sd_pair: float | None, alpha: float
            ) -> dict[str, Callable[[int, float], float]]:
    """Each design's power at (seeds per arm, true difference)."""
    out: dict[str, Callable[[int, float], float]] = {
        "helps_unpaired": lambda n, delta: power_two_sample(n, sd, delta, alpha),
        "does_not_help_unpaired":
            lambda n, delta: power_bound(n, sd * 2 ** 0.5, 2 * n - 2, delta, alpha)}
    if sd_pair is not None:
        out["helps_paired"] = lambda n, delta: power_paired(n, sd_pair, delta, alpha)
        out["does_not_help_paired"] = lambda n, delta: power_bound(n, sd_pair, n - 1, delta,
                                                                   alpha)
    return out


def smallest_delta(power_of: Callable[[int, float], float], n: int, target: float) -> float:
    """The smallest difference (0.01 steps) a design calls with `target` power at n seeds."""
    delta = 0.01
    while power_of(n, delta) < target and delta < 20:
        delta += 0.01
    return round(delta, 2)


def plan(rows: list[dict], deltas: list[float], alpha: float, power: float,
         budget_seeds: list[int]) -> dict:
    """Seeds per arm for each effect size, unpaired and paired, from the largest spreads seen
    at the large batches (the design must hold for its noisiest cell)."""
    large = [r for r in rows if r["batch"] != min(r["batch"] for r in rows)]
    sd = max(r["sd"] for r in large if r["sd"] is not None)
    sd_pair = max((r["sd_paired_difference"] for r in large if "sd_paired_difference" in r),
                  default=None)
    powers = designs(sd, sd_pair, alpha)
    return {"alpha": alpha, "power": power, "sd_unpaired": sd, "sd_paired_difference": sd_pair,
            "by_delta": [{"delta": delta,
                          **{name: seeds_needed(partial(power_of, delta=delta), power)
                             for name, power_of in powers.items()}}
                         for delta in deltas],
            "by_budget": [{"seeds": n,
                           "smallest_delta": {name: smallest_delta(power_of, n, power)
                                              for name, power_of in powers.items()}}
                          for n in budget_seeds]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study_power",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=STUDY)
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--budget-seeds", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = spreads(json.loads(args.study.read_text())["runs"])
    result = {"study": str(args.study), "cells": rows,
              **plan(rows, args.deltas, args.alpha, args.power, args.budget_seeds)}
    for row in rows:
        paired = (f", paired sd {row['sd_paired_difference']:.2f} (r = "
                  f"{row['pair_correlation']:+.2f}, {row['pairs']} pairs)"
                  if "pairs" in row else "")
        sd = f"{row['sd']:.2f}" if row["sd"] is not None else "-"
        print(f"batch {row['batch']:>4} {row['arm']:<13} {row['runs']:>2} runs: "
              f"{row['mean']:.2f} +- {sd}{paired}")
    print(f"\nseeds per arm for power {args.power} at alpha {args.alpha} (sd "
          f"{result['sd_unpaired']:.2f} unpaired, {result['sd_paired_difference']:.2f} paired):")
    for entry in result["by_delta"]:
        print(f"  delta {entry['delta']:.2f}: " + ", ".join(
            f"{k} {v}" for k, v in entry.items() if k != "delta"))
    print("\nsmallest difference each design calls at a number of seeds:")
    for entry in result["by_budget"]:
        print(f"  {entry['seeds']:>3} seeds: " + ", ".join(
            f"{k} {v}" for k, v in entry["smallest_delta"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
