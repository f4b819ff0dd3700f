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
    # tuning: vanilla 1 + 2 + 2 runs, ConAdv 2 (nothing fits in 3 steps: every grid epochs);
    # reported: 4 cells x 2 seeds; the seed check: seed 0 and one fresh seed
    assert first["trained"] == 17 and len(first["runs"]) == 8
    assert len(first["seed_check_runs"]) == 2
    assert {c["arm"] for c in first["cells"] if c["batch"] == 150} == set(matched_fit_study.ARMS)
    equal = first["tuned"]["equal_large"]
    assert equal["epochs"] == pytest.approx(2 * 8 / 3, abs=0.01)  # ConAdv's epochs x 8/3
    table = (out / "matched_fit_study.md").read_text()
    assert "| 150 | conadv_tau1 |" in table and "| 1 | vanilla @ 75 - vanilla @ 150" in table
    assert "not at matched fit" in table  # nothing fits in three steps
    assert (out / "matched_fit_study.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "matched_fit_study.json").read_text())["verdicts"]["gap"]

    lost = first["runs"][2]
    (cache / "quick" / f"{lost['key']}.json").unlink()  # as if interrupted before it finished
    again = matched_fit_study.main(argv)
    assert again["trained"] == 1
    assert [i["trained"] for i in again["invocations"]] == [17, 1]
    redone = next(r for r in again["runs"] if r["key"] == lost["key"])
    for key in ("top1", "train_top1", "pgd_top1", "sharp_hessian_top_eigenvalue",
                "forward_equivalents"):
        assert redone[key] == lost[key], key  # the same config trains the same numbers


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
