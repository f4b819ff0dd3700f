"""benchmarks/study_rules.py: the statistics against scipy's t tests, and every verdict of
docs/study_rules.md on made-up runs whose answer is known."""

import json
import math
import statistics

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
        (statistics.mean([a - b for a, b in zip(A, B)]), reference.low, reference.high),
        abs=1e-9)
    fewer = rules.paired(runs(A), runs(B[:6]))  # seeds 7-10 have no partner
    assert fewer.n == (6,)


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
    (-1.0, 100.0, "ConAdv does not help by 0.6 points or more (ConAdv worse)"),
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


def test_sharpness_across_batches_is_unpaired():
    """The same seed at two batches is no pair: Welch on log lambda_max, whatever the order."""
    a = sharp([60.0 + s for s in range(10)], [0.01] * 10)
    b = sharp([200.0 + 3 * s for s in range(10)], [0.01] * 10)
    b_reversed = [dict(r, seed=11 - r["seed"]) for r in b]
    unpaired = rules.sharpness_verdict(a, b_reversed, paired_by_seed=False)
    logs_a = [math.log(r["sharp_hessian_top_eigenvalue"]) for r in a]
    logs_b = [math.log(r["sharp_hessian_top_eigenvalue"]) for r in b]
    reference = stats.ttest_ind(logs_a, logs_b, equal_var=False).confidence_interval(0.95)
    ratio = unpaired["lambda_log_ratio"]
    assert (ratio["low"], ratio["high"]) == pytest.approx((reference.low, reference.high))
    assert unpaired["lambda_verdict"] == "flatter" and not unpaired["paired_by_seed"]
    assert rules.sharpness_verdict(a, sharp([-1.0] * 10, [0.01] * 10),
                                   paired_by_seed=False)["lambda_verdict"] == \
        "not positive in every run"


def seed_cell(top1s, train, seeds, pgd=20.0):
    return [dict(r, train_top1=train + 0.01 * (i % 2), pgd_top1=pgd)
            for i, r in enumerate(runs(top1s, seeds=seeds))]


PUBLISHED = seed_cell(A, 100.0, range(10))


@pytest.mark.parametrize("fresh_top1, fresh_train, verdict", [
    ([x - 0.8 for x in A], 100.0, "seeds 0-9 differ from fresh seeds"),
    (A, 99.0, "seeds 0-9 differ from fresh seeds"),  # the training split alone
    ([x + e for x, e in zip(A, SPREAD)], 100.0,
     "no difference between seeds 0-9 and fresh seeds"),
    (A[:1], 100.0, "too few seeds"),
])
def test_the_seed_check_against_published_records_the_code_reproduces(fresh_top1, fresh_train,
                                                                        verdict):
    fresh = seed_cell(fresh_top1, fresh_train, range(10, 20))
    result = rules.seed_verdict(PUBLISHED, [dict(r) for r in PUBLISHED], fresh)
    assert result["verdict"] == verdict
    assert result["code_reproduces_published"] and result["drift"]["top1"]["mean"] == 0.0


def test_when_todays_code_measures_differently_the_seed_check_compares_like_with_like():
    """Today's code measures the training split 0.5 points lower on the same seeds; fresh
    seeds measured today look like seeds 0-9 measured today, not like the published ones."""
    reruns = seed_cell(A, 99.5, range(10))
    fresh = seed_cell([x + e for x, e in zip(A, SPREAD)], 99.5, range(10, 20))
    result = rules.seed_verdict(PUBLISHED, reruns, fresh)
    assert not result["code_reproduces_published"]
    assert result["compared_with"] == "reruns of seeds 0-9"
    assert result["verdict"] == "no difference between seeds 0-9 and fresh seeds"
    assert result["drift"]["train_top1"]["mean"] == pytest.approx(-0.5)
    against_published = rules.seed_verdict(PUBLISHED, PUBLISHED, fresh)
    assert against_published["verdict"] == "seeds 0-9 differ from fresh seeds"


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


def test_tuning_stops_at_the_shortest_epochs_that_fit_and_the_study_follows_it(monkeypatch):
    """A scripted study (no training): vanilla fits at batch 75 from the first epochs with LR
    8 best, at batch 750 only at its second epochs, ConAdv only at its second; the reported
    runs take those settings and the equal-compute arm ConAdv's epochs x 8/3."""
    from benchmarks import matched_fit_study as study

    def fits(run):
        if run.arm == "first_vanilla":
            return True
        if run.arm == "conadv_tau1":
            return run.epochs >= 60
        return run.batch == 75 or run.epochs >= 60

    def record(run):
        steps = int(run.epochs * 3000 / run.batch)
        per_step = run.batch * (8 if run.arm == "conadv_tau1" else 3)
        return {"arm": run.arm, "batch": run.batch, "seed": run.seed, "epochs": run.epochs,
                "lr": run.lr, "steps": steps, "forward_equivalents": steps * per_step,
                "top1": 97.0 - abs(math.log2(run.lr / (8 if run.batch == 75 else 1))),
                "train_top1": 100.0 if fits(run) else 98.0}

    calls = []

    def scripted(runs, cache, workers):
        calls.append([(r.arm, r.batch, r.epochs, r.holdout) for r in runs])
        return [record(r) for r in runs], len(runs)

    monkeypatch.setattr(study, "run_all", scripted)
    phases = study.run_phases(study.FULL, cache=None, workers=2)
    tuned = phases["tuned"]
    assert (tuned["vanilla_small"].epochs, tuned["vanilla_small"].lr) == (20, 8)
    assert (tuned["vanilla_large"].epochs, tuned["vanilla_large"].lr) == (60, 1)
    assert tuned["conadv_large"].epochs == 60 and tuned["conadv_large"].fits
    assert tuned["equal_large"].epochs == 160.0  # 60 x 8/3: equal counted compute
    # rounds: vanilla at both batches, then batch 750 alone; ConAdv 30 (+ vanilla's reported
    # runs), 60 (+ the seed check); never 90
    assert [c[0][:3] for c in calls[:4]] == [("vanilla", 75, 20), ("vanilla", 750, 60),
                                            ("conadv_tau1", 750, 30), ("conadv_tau1", 750, 60)]
    assert not any(("conadv_tau1", 750, 90, "validation") in c for c in calls)
    reported = {(r["arm"], r["batch"], r["epochs"]) for r in phases["records"]}
    assert reported == {("vanilla", 75, 20), ("vanilla", 750, 60), ("conadv_tau1", 750, 60),
                        ("vanilla_equal", 750, 160.0)}
    assert {r["seed"] for r in phases["records"]} == set(range(1, 11))
    assert sorted(r["seed"] for r in phases["seed_check"]) == list(range(20))


def test_an_invocation_that_fails_still_counts_its_time(tmp_path, monkeypatch):
    from benchmarks import matched_fit_study as study

    def failing(design, cache, workers):
        raise RuntimeError("run 0123456789abcdef diverged")

    monkeypatch.setattr(study, "run_phases", failing)
    with pytest.raises(RuntimeError, match="diverged"):
        study.main(["--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path)])
    invocations = json.loads((tmp_path / "quick" / "invocations.json").read_text())
    assert len(invocations) == 1 and invocations[0]["interrupted"]
