"""benchmarks/study_rules.py: the statistics against scipy's t tests, and every verdict of
docs/study_rules.md on made-up runs whose answer is known."""

import math

import pytest
from scipy import stats

from benchmarks import study_rules as rules
from benchmarks.matched_fit_study import choose, compute_ratio


def runs(top1s, train_top1=100.0, seeds=None, **extra):
    seeds = range(1, len(top1s) + 1) if seeds is None else seeds
    return [{"seed": s, "top1": t, "train_top1": train_top1,
             **{k: v[i] for k, v in extra.items()}} for i, (s, t) in enumerate(zip(seeds, top1s))]


A = [97.1, 96.4, 97.9, 96.8, 97.3, 96.2, 97.6, 97.0, 96.9, 97.4]
B = [96.0, 95.1, 96.5, 95.9, 96.8, 95.2, 96.1, 95.5, 96.3, 95.0]


def test_welchs_interval_is_scipys():
    reference = stats.ttest_ind(A, B[:7], equal_var=False).confidence_interval(0.95)
    mine = rules.welch(runs(A), runs(B[:7]))
    assert (mine.low, mine.high) == pytest.approx((reference.low, reference.high), abs=1e-9)
    assert mine.n == (10, 7)


def test_the_paired_interval_is_scipys_and_pairs_by_seed_not_position():
    reference = stats.ttest_rel(A, B).confidence_interval(0.95)
    shuffled = list(reversed(runs(B)))  # the same seeds in another order
    mine = rules.paired(runs(A), shuffled)
    assert (mine.mean, mine.low, mine.high) == pytest.approx(
        (statistics_mean([a - b for a, b in zip(A, B)]), reference.low, reference.high),
        abs=1e-9)
    fewer = rules.paired(runs(A), runs(B[:6]))  # seeds 7-10 have no partner
    assert fewer.n == (6,)


def statistics_mean(values):
    return sum(values) / len(values)


def test_the_log_ratio_is_the_geometric_mean_ratio_and_refuses_non_positive_values():
    a = runs(A, lam=[2.0] * 9 + [4.0])
    b = runs(B, lam=[1.0] * 10)
    d = rules.log_ratio(a, b, "lam")
    assert math.exp(d.mean) == pytest.approx((2.0 ** 9 * 4.0) ** 0.1, rel=1e-12)
    assert rules.log_ratio(runs(A, lam=[0.0] * 10), b, "lam") is None


@pytest.mark.parametrize("small, small_fit, large, large_fit, verdict", [
    (A, 100.0, B, 99.5, "gap"),  # 99.5 % is a fit
    (A, 100.0, B, 99.4, "not at matched fit"),
    (A, 99.0, B, 100.0, "not at matched fit"),
    (A, 100.0, A, 100.0, "no gap of 0.6 points or more"),
    (A, 100.0, [x - 0.3 + (1.5 if s % 2 else -1.5) for s, x in enumerate(A)], 100.0,
     "inconclusive"),
    (A[:1], 100.0, B, 100.0, "too few seeds"),
])
def test_the_gap_rule(small, small_fit, large, large_fit, verdict):
    result = rules.gap_verdict(runs(small, small_fit), runs(large, large_fit))
    assert result["verdict"] == verdict, result


SPREAD = [0.1, -0.1, 0.05, -0.05, 0.0, 0.1, -0.1, 0.05, -0.05, 0.0]


@pytest.mark.parametrize("shift, conadv_fit, verdict", [
    (0.8, 100.0, "ConAdv helps"),
    (0.3, 100.0, "ConAdv helps"),  # small but certain: helps, the table shows its size
    (0.0, 100.0, "ConAdv does not help by 0.6 points or more"),
    (-1.0, 100.0, "ConAdv does not help by 0.6 points or more"),
    (0.8, 99.0, "not at matched fit"),  # ConAdv trained for too few epochs to fit
])
def test_the_conadv_rule(shift, conadv_fit, verdict):
    vanilla = runs(B)
    conadv = runs([b + shift + e for b, e in zip(B, SPREAD)], conadv_fit)
    assert rules.conadv_verdict(vanilla, conadv)["verdict"] == verdict


def test_a_noisy_conadv_difference_is_inconclusive():
    conadv = runs([b + 0.3 + (1.0 if s % 2 else -1.0) for s, b in enumerate(B)])
    assert rules.conadv_verdict(runs(B), conadv)["verdict"] == "inconclusive"


@pytest.mark.parametrize("shift, noise, verdict", [
    (0.5, 0.05, "ConAdv beats training longer"),
    (-0.5, 0.05, "training longer does more"),
    (0.0, 0.05, "equal within 0.6 points"),
    (0.3, 1.0, "inconclusive"),
])
def test_the_equal_compute_rule_holds_whatever_the_fit(shift, noise, verdict):
    longer = runs(B)
    conadv = runs([b + shift + (noise if s % 2 else -noise) for s, b in enumerate(B)],
                  train_top1=97.0)  # compute is what is matched, not fit
    assert rules.equal_compute_verdict(conadv, longer)["verdict"] == verdict


def sharp(lams, rests, fit=100.0):
    return runs(A, fit, sharp_hessian_top_eigenvalue=lams, sharp_second_order=rests,
                sharp_first_order=[1.0] * len(lams))


def test_sharpness_is_compared_by_log_ratio_so_one_seed_cannot_decide():
    """vanilla's mean lambda_max is dominated by one seed (as in the first study); on a log
    scale ConAdv is flatter in every seed, and its curvature rest is no different."""
    rests = [0.010 + 0.001 * (s % 3) for s in range(10)]
    conadv = sharp([60.0 + s for s in range(10)], rests)
    vanilla = sharp([200.0 + 3 * s for s in range(9)] + [2400.0], list(reversed(rests)))
    result = rules.sharpness_verdict(conadv, vanilla)
    assert result["lambda_verdict"] == "flatter"
    assert result["second_order_verdict"] == "no difference shown"
    assert result["medians"]["sharp_hessian_top_eigenvalue"] == [64.5, 213.5]
    sharper = rules.sharpness_verdict(vanilla, conadv)
    assert sharper["lambda_verdict"] == "sharper"


def test_sharpness_is_not_compared_unless_both_fit():
    fitted, unfitted = sharp([1.0] * 10, [0.1] * 10), sharp([9.0] * 10, [0.9] * 10, fit=98.0)
    result = rules.sharpness_verdict(fitted, unfitted)
    assert result["verdict"] == "not at matched fit: not compared"
    assert "lambda_log_ratio" not in result and result["medians"]  # medians still reported


@pytest.mark.parametrize("fresh_top1, fresh_train, verdict", [
    ([x - 0.8 for x in A], 100.0, "the published seeds differ from fresh seeds"),
    (A, 99.0, "the published seeds differ from fresh seeds"),  # the training split alone
    ([x + e for x, e in zip(A, SPREAD)], 100.0,
     "no difference between the published seeds and fresh seeds"),
    (A[:1], 100.0, "too few seeds"),
])
def test_the_seed_check(fresh_top1, fresh_train, verdict):
    published = [dict(r, train_top1=100.0 + 0.01 * (s % 2)) for s, r in enumerate(runs(A))]
    fresh = [dict(r, train_top1=fresh_train + 0.01 * (s % 2))
             for s, r in enumerate(runs(fresh_top1, seeds=range(10, 20)))]
    assert rules.seed_verdict(published, fresh)["verdict"] == verdict


def test_tuning_chooses_the_best_lr_among_those_that_fit():
    grid = [{"lr": 1.0, "top1": 97.0, "train_top1": 99.0},
            {"lr": 2.0, "top1": 96.5, "train_top1": 99.8},
            {"lr": 4.0, "top1": 96.5, "train_top1": 100.0}]
    assert choose(grid)["lr"] == 2.0  # the best that fits; the tie goes to the smaller LR
    assert choose([dict(r, train_top1=90.0) for r in grid]) is None


def test_equal_compute_matches_the_counted_forward_equivalents():
    conadv = {"forward_equivalents": 6000 * 120, "steps": 120}
    vanilla = {"forward_equivalents": 2250 * 240, "steps": 240}
    assert compute_ratio(conadv, vanilla) == pytest.approx(8 / 3, rel=1e-12)


def test_the_report_gives_the_share_of_the_gap_conadv_closes():
    from benchmarks.matched_fit_study import QUICK, decide

    sharpness = {k: [1.0] * 10 for k in ("sharp_hessian_top_eigenvalue", "sharp_second_order",
                                         "sharp_first_order")}

    def cell(arm, batch, top1s):
        return [dict(r, arm=arm, batch=batch) for r in runs(top1s, **sharpness)]

    vanilla = [b - 1.0 for b in B]
    records = (cell("vanilla", QUICK.small, [b + 1.0 for b in B])
               + cell("vanilla", QUICK.large, vanilla)
               + cell("conadv_tau1", QUICK.large, [v + 1.0 + e for v, e in zip(vanilla, SPREAD)])
               + cell("vanilla_equal", QUICK.large, B))
    verdicts = decide(QUICK, records)
    assert verdicts["gap"]["verdict"] == "gap" and verdicts["conadv"]["verdict"] == "ConAdv helps"
    assert verdicts["conadv"]["share_of_gap"] == pytest.approx(0.5, abs=1e-9)  # 1 of 2 points
    assert verdicts["equal_compute"]["verdict"] == "equal within 0.6 points"
