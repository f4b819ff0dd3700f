"""benchmarks/study_power.py: the power of each design against textbook values and a
simulation written out here."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from benchmarks.study_power import (
    power_bound,
    power_paired,
    power_two_sample,
    seeds_needed,
    spreads,
)


def test_t_test_power_matches_cohens_tables():
    # Cohen (1988): d = 0.5 needs 64 per group (two-sample) and 34 pairs (paired) for 0.80
    assert power_two_sample(64, 1.0, 0.5, 0.05) == pytest.approx(0.8015, abs=0.001)
    assert power_paired(34, 1.0, 0.5, 0.05) == pytest.approx(0.808, abs=0.002)
    assert seeds_needed(lambda n: power_two_sample(n, 1.0, 0.5, 0.05), 0.8) == 64


def test_the_bound_that_says_does_not_help_matches_a_simulation():
    """The upper end of the 95 % interval of a paired difference whose truth is 0 falls below
    delta this often (20,000 simulated studies: standard error 0.003)."""
    rng = np.random.default_rng(0)
    n, sd, delta = 14, 0.61, 0.5
    draws = rng.normal(0.0, sd, (20_000, n))
    upper = draws.mean(1) + stats.t.ppf(0.975, n - 1) * draws.std(1, ddof=1) / n ** 0.5
    assert power_bound(n, sd, n - 1, delta, 0.05) == pytest.approx((upper < delta).mean(),
                                                                     abs=0.01)


def test_spreads_pair_only_the_same_seed_at_the_same_batch():
    runs = [{"batch": 750, "arm": arm, "seed": seed, "top1": top1}
            for arm, values in [("vanilla", [94.0, 95.0, 96.0, 93.0]),
                                ("conadv_tau1", [94.5, 95.0, 96.5, 94.0])]
            for seed, top1 in enumerate(values)]
    runs.append({"batch": 75, "arm": "vanilla", "seed": 9, "top1": 99.0})
    rows = {(r["batch"], r["arm"]): r for r in spreads(runs)}
    conadv = rows[(750, "conadv_tau1")]
    assert conadv["pairs"] == 4
    assert conadv["sd_paired_difference"] == pytest.approx(np.std([0.5, 0, 0.5, 1], ddof=1))
    assert "pairs" not in rows[(75, "vanilla")]
