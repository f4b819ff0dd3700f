"""Run reports (conadv-report) and the training-subset evaluation behind the train-test gap."""

import json
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_png, read_file

from conadv.config import load_config
from conadv.data.loader import build_eval_loader
from conadv.models.factory import CifarResNet, ImageClassifier
from conadv.train.evaluate import evaluate
from conadv.train.job import train
from tests.helpers import TINY, run_gloo_ranks, run_module, tiny_config


def test_report_of_two_runs_writes_figures_and_their_final_accuracies(tmp_path):
    runs = []
    for name, extra in (("vanilla", []), ("conadv", ["adv.enabled=true"])):
        summary = train(tiny_config(tmp_path / name, "train.max_steps=4",
                                    "train.eval_train_images=64", *extra))
        runs.append((tmp_path / name, summary))
    result = run_module("conadv.cli.report", *(str(p) for p, _ in runs), "--out",
                        str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"report: {tmp_path / 'report' / 'report.md'}" in result.stdout
    blue, orange = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1
    for figure, colours in (("loss.png", [blue, orange]), ("accuracy.png", [blue, orange]),
                            ("lr.png", [orange]), ("throughput.png", [orange])):
        # each run's curve in its own colour (the two runs' LR schedules coincide: the second
        # is drawn over the first)
        image = decode_png(read_file(str(tmp_path / "report" / figure)))[:3]
        for colour in colours:
            close = (image.int() - torch.tensor(colour)[:, None, None]).abs().amax(dim=0) < 40
            assert close.sum() > 100, (figure, colour)
    lines = (tmp_path / "report" / "report.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[2].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
            for line in lines[4:] if line.startswith("| ")]
    assert [row["run"] for row in rows] == ["adv.enabled=False", "adv.enabled=True"]
    for (_, summary), row in zip(runs, rows):
        final = summary["final_eval"]
        assert row["test top-1 %"] == f"{final['top1']:.2f}"
        assert row["train top-1 %"] == f"{final['train_top1']:.2f}"
        assert row["train-test gap"] == f"{final['train_test_gap']:.2f}"
        assert row["steps"] == str(summary["steps"]) and row["finished"] == "True"


def test_runs_that_differ_in_their_teachers_are_labelled_by_the_teachers_files():
    from conadv.report import Run, label_runs

    teachers = ["distill.enabled=true", "distill.teachers=[{weights: runs/t1}, "
                "{weights: t2.pt, arch: resnet18}]"]
    runs = [Run(Path("a"), load_config(None, teachers)), Run(Path("b"), load_config(None))]
    label_runs(runs)
    assert ("distill.teachers=[{weights: runs/t1}, {weights: t2.pt, arch: resnet18}]"
            in runs[0].label)
    assert "distill.teachers=[]" in runs[1].label


def test_report_of_a_directory_that_is_not_a_run_is_one_line(tmp_path):
    result = run_module("conadv.cli.report", str(tmp_path), "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"conadv-report: error: {tmp_path} is not a run directory "
                                     "(config.yaml and metrics.jsonl are missing)")


def test_training_subset_evaluation_is_logged_beside_the_test_accuracy(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=3", "train.eval_train_images=100"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert final["train_count"] == 100 and final["count"] == 360
    assert final["train_test_gap"] == pytest.approx(final["train_top1"] - final["top1"])


def _subset_accuracy(rank: int, world: int) -> dict:
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(10, width=8))
    loader = build_eval_loader(cfg.data, world, rank, 16, torch.device("cpu"), split="train",
                               subset=101, seed=5)
    return evaluate(model, loader, torch.device("cpu"))


@pytest.mark.slow
def test_training_subset_evaluation_is_the_same_on_one_and_two_ranks(tmp_path):
    one = _subset_accuracy(0, 1)
    two = run_gloo_ranks(2, _subset_accuracy, tmp_path)
    assert one["count"] == two[0]["count"] == two[1]["count"] == 101
    assert one["top1"] == two[0]["top1"] == two[1]["top1"]
    assert one["loss"] == pytest.approx(two[0]["loss"], rel=1e-6)
