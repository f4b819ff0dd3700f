"""The benchmark scripts run and report what they promise (no timing is asserted here)."""

import json

import pytest
import torch

from benchmarks import (
    checkpoint_stall,
    data_pipeline,
    index_startup,
    launch_budget,
    optimizer_step,
    scaling_model,
    step_throughput,
)
from conadv.data.dali import dali_installed


def test_every_training_mode_dispatches_within_its_launch_budget():
    """Operations per step are counted exactly (no timing): vanilla within 10 % of a bare loop
    with the same optimizer, ConAdv within 10 % of a bare attack + two-view loop, the skip
    policy at most 10 operations more, the EMA one."""
    report = launch_budget.run(launch_budget.parse_args(
        ["--size", "small", "--steps", "2", "4", "--no-host-time"]))
    over = {mode: (row["ops_per_step"], row["budget"]) for mode, row in report["modes"].items()
            if not row["within_budget"]}
    assert not over, over
    assert set(report["modes"]) == set(launch_budget.MODES)
    assert report["bare"]["bare-sgd"] > 100  # a forward, a backward and an optimizer step


def test_the_launch_count_sees_every_operation_a_step_adds(monkeypatch):
    """Not vacuous: 20 more operations in each step are 20 more counted per step."""
    from conadv.train.trainer import Trainer

    vanilla = ["adv.enabled=false", *launch_budget.SIZES["small"]]

    def counted() -> float:
        return launch_budget.per_step(lambda n: launch_budget.count_trainer(vanilla, n),
                                      2, 4)[0]

    counted()  # imports that dispatch operations
    plain = counted()
    step = Trainer.train_step

    def busier(self):
        scratch = torch.zeros(())
        for _ in range(19):
            scratch.add_(1)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", busier)
    assert counted() == plain + 20


def test_scaling_model_reproduces_the_mlperf_point_within_25_percent():
    report = scaling_model.run(overlap=0.0)
    assert abs(report["mlperf_check"]["relative_error"]) < 0.25
    rows = report["predictions_96k"]["vanilla"]
    assert [r["gpus"] for r in rows] == [64, 128, 256, 512, 1024, 2048]
    assert all(r["micro_batch"] * r["accumulation"] * r["gpus"] == 98_304 for r in rows)
    # more overlap can only help ConAdv, and it never beats vanilla
    tau1 = scaling_model.run(overlap=0.5)["predictions_96k"]["tau1"]
    for hidden, plain, vanilla in zip(tau1, report["predictions_96k"]["tau1"], rows):
        assert vanilla["step_ms"] < hidden["step_ms"] < plain["step_ms"]


@pytest.mark.slow
def test_step_throughput_reports_every_mode(tmp_path):
    args = step_throughput.parse_args(["--device", "cpu", "--batch", "16", "--rounds", "1",
                                       "--steps", "1", "--warmup", "1", "--teachers", "2",
                                       "--out", str(tmp_path / "r.json")])
    report = step_throughput.run(args)
    assert set(report["modes"]) == {"vanilla", "tau0", "tau1", "vanilla+KD", "tau1+KD"}
    for entry in report["modes"].values():
        assert entry["step_ms"] > 0 and entry["img_per_s"] > 0
    assert report["modes"]["vanilla"]["attack_ms"] == 0
    assert report["modes"]["tau0"]["attack_ms"] > 0
    assert "tau1 / tau0 step time" in report["ratios"]
    assert report["ratios"]["vanilla+KD / vanilla FLOP expectation"] == pytest.approx(5 / 3)


@pytest.mark.slow
def test_optimizer_and_data_benchmarks_run(tmp_path):
    report = optimizer_step.run(torch.device("cpu"), rounds=1, steps_per_round=1)
    assert {"conadv LARS", "conadv LAMB", "torch AdamW (fused)"} <= set(report["results"])
    assert report["tensors"] == 161 and report["parameters"] == 25_557_032
    data = data_pipeline.run(images=64, workers=1, repeats=1)  # 1 timed batch of 32
    assert data["results"]["none"]["per_worker_speedup"] > 0
    recipes = data["results"]["recipes"]
    backends = ("torchvision", "dali") if dali_installed() else ("torchvision",)
    assert set(recipes) == {f"{r}_{b}" for r in ("plain", "three_views") for b in backends}
    assert all(r["img_s"] > 0 and r["host_cpu_ms_per_img"] > 0 for r in recipes.values())
    json.dumps(data)  # serialisable as written to results/


@pytest.mark.slow
def test_checkpoint_stall_benchmark_writes_real_checkpoints():
    args = checkpoint_stall.parse_args(["--device", "cpu", "--batch", "16", "--rounds", "1"])
    report = checkpoint_stall.run(args)
    assert report["checkpoint_mb"] > 0.5  # model, LARS momentum and the tau = 1 snapshot
    for key in ("normal_step_ms", "checkpoint_step_ms", "step_after_checkpoint_ms",
                "synchronous_write_ms"):
        assert report[key] > 0


@pytest.mark.slow
def test_matched_fit_study_writes_its_report_and_a_rerun_trains_only_the_missing_runs(tmp_path):
    from benchmarks import matched_fit_study

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--quick", "--out", str(out), "--cache", str(cache)]
    first = matched_fit_study.main(argv)
    # LR grid: 1 + 2 runs; reported: 2 arms x 2 seeds at 75, 4 arms x 2 seeds at 375
    assert first["trained"] == 15 and len(first["runs"]) == 12
    assert {c["arm"] for c in first["cells"] if c["batch"] == 375} == set(matched_fit_study.ARMS)
    table = (out / "matched_fit_study.md").read_text()
    assert "| 375 | conadv_tau1 |" in table and "batch 375: **" in table
    assert (out / "matched_fit_study.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "matched_fit_study.json").read_text())["verdicts"]

    lost = first["runs"][2]
    (cache / "quick" / f"{lost['key']}.json").unlink()  # as if interrupted before it finished
    again = matched_fit_study.main(argv)
    assert again["trained"] == 1
    assert [i["trained"] for i in again["invocations"]] == [15, 1]
    redone = next(r for r in again["runs"] if r["key"] == lost["key"])
    for key in ("top1", "train_top1", "pgd_top1", "hessian_top_eigenvalue"):
        assert redone[key] == lost[key], key  # the same config trains the same numbers


def _runs(arm, top1s, train_top1=100.0):
    return [{"arm": arm, "seed": seed, "top1": top1, "train_top1": train_top1}
            for seed, top1 in enumerate(top1s)]


# batch 75 has 5 seeds, the large batch 10: the gap pairs seeds 0-4 only; seeds 5-9 of large
# vanilla sit 2 points lower, so an unpaired mean (or pairing by position) gives another G
SMALL = [98.0 + 0.05 * (s % 2) for s in range(5)]
LARGE = [97.0 + 0.05 * (s % 3) for s in range(5)] + [95.0] * 5


@pytest.mark.parametrize("large_train, conadv_large, conadv_small, verdict", [
    (99.4, [97.0] * 10, [98.0] * 5, "no gap at matched fit (large-batch vanilla does not fit"),
    (100.0, [x + 0.6 + 0.05 * (s % 3) for s, x in enumerate(LARGE)], [98.0] * 5,
     "ConAdv helps"),
    (100.0, [x - 0.1 + 0.05 * (s % 3) for s, x in enumerate(LARGE)], [98.0] * 5,
     "ConAdv does not help"),
    # a CI inside (0, G / 4) that does not beat batch 75's own difference: no help either
    (100.0, [x + 0.1 + 0.05 * (s % 3) for s, x in enumerate(LARGE)], [98.5] * 5,
     "ConAdv does not help"),
    (100.0, [x - 0.2 + 1.2 * (s % 2) for s, x in enumerate(LARGE)], [98.0] * 5, "inconclusive"),
    # ConAdv lifts the small batch as much as the large one: not a large-batch effect
    (100.0, [x + 0.6 + 0.05 * (s % 3) for s, x in enumerate(LARGE)], [98.7] * 5,
     "inconclusive"),
    (99.5, [x + 0.6 + 0.05 * (s % 3) for s, x in enumerate(LARGE)], [98.0] * 5,
     "ConAdv helps"),  # 99.5 % is a fit
])
def test_the_study_verdict_follows_the_written_rules(large_train, conadv_large, conadv_small,
                                                     verdict):
    from benchmarks.matched_fit_study import decide

    result = decide(_runs("vanilla", SMALL), _runs("conadv_tau1", conadv_small),
                    _runs("vanilla", LARGE, large_train), _runs("conadv_tau1", conadv_large))
    assert result["verdict"].startswith(verdict), result
    assert result["gap_pairs"] == 5
    assert result["gap"] == pytest.approx(0.98, abs=1e-9)  # paired over seeds 0-4 only


def test_the_confidence_interval_uses_students_t():
    from benchmarks.matched_fit_study import mean_ci

    mean, se, half = mean_ci([1.0, 2.0, 3.0])
    assert (mean, se) == (2.0, pytest.approx(0.57735, abs=1e-5))
    assert half == pytest.approx(4.3027 * 0.57735, abs=1e-3)  # t(0.975, 2), not 1.96


def test_a_gap_smaller_than_half_a_point_or_three_standard_errors_is_no_gap():
    from benchmarks.matched_fit_study import decide

    small = _runs("vanilla", [97.4] * 10)
    large = _runs("vanilla", [97.0] * 10)
    assert not decide(small, small, large, large)["gap_exists"]  # 0.4 < 0.5 points
    noisy = _runs("vanilla", [97.0 + (3.0 if s % 2 else -3.0) for s in range(10)])
    wide = _runs("vanilla", [98.0] * 10)  # G = 1.0 but 3 SE = 3 x 1.0
    assert not decide(wide, wide, noisy, noisy)["gap_exists"]
    one = _runs("vanilla", [99.0])  # one pair: no standard error, no gap
    assert not decide(one, one, large, large)["gap_exists"]


def test_the_lr_is_chosen_among_the_runs_that_fit():
    from benchmarks.matched_fit_study import choose_lr

    grid = [{"lr": 1.0, "top1": 97.0, "train_top1": 99.0},
            {"lr": 2.0, "top1": 96.5, "train_top1": 99.8},
            {"lr": 4.0, "top1": 96.5, "train_top1": 100.0}]
    assert choose_lr(grid) == 2.0  # the best that fits; the tie goes to the smaller LR
    assert choose_lr([dict(r, train_top1=90.0) for r in grid]) == 1.0  # none fits


@pytest.mark.slow
def test_distill_study_reduced_grid_trains_teachers_and_students(tmp_path):
    from benchmarks import distill_study

    report = distill_study.main(["--quick", "--out", str(tmp_path)])
    assert len(report["teachers"]) == 2 and 0 <= report["ensemble_top1"] <= 100
    assert [r["method"] for r in report["runs"]] == ["alone", "distilled"]
    assert report["student_params"] < report["teacher_params"]
    table = (tmp_path / "distillation.md").read_text()
    for run in report["runs"]:
        assert f"| 64 | {run['steps']} | {run['method']} | {run['top1']:.2f} +- 0.00 |" in table


def test_index_startup_benchmark_indexes_every_file():
    report = index_startup.run(files=2000, classes=20)
    assert report["files"] == 2000 and report["cached_s"] > 0 and report["first_run_walk_s"] > 0
