"""The console entry points as a user runs them."""

import json

import pytest
import torch

from tests.helpers import REPO, run_module


@pytest.mark.slow
def test_train_then_eval_and_export(tmp_path):
    run = tmp_path / "run"
    trained = run_module("conadv.cli.train", "--config", str(REPO / "configs/demo.yaml"),
                         f"log.run_dir={run}", "train.epochs=2", "log.progress=false",
                         # the robust evaluation with 3 PGD steps, not 10: the same path, a
                         # third of its time (the suite's budget)
                         "eval.pgd_steps=3", "train.eval_train_images=0")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "final test top-1:" in trained.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval"]["count"] == 360 and summary["final_eval"]["top1"] > 50

    export = tmp_path / "resnet.pth"
    evaluated = run_module("conadv.cli.evaluate", "--config", str(run / "config.yaml"),
                           "--checkpoint", str(run), "--export", str(export), "--robust",
                           "--autoattack", "--autoattack-images", "16")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(summary["final_eval"]["top1"])
    assert result["pgd3_top1"] == pytest.approx(summary["final_eval"]["pgd3_top1"])
    # AutoAttack on 16 seeded images: the worst case over its attacks is at most PGD's, and
    # below clean
    worst = result["autoattack"]
    assert worst["count"] == 16
    assert worst["autoattack_top1"] <= worst["pgd3_top1"] and worst["autoattack_top1"] < \
        worst["top1"]
    assert "PGD3 top-1:" in trained.stdout  # the demo reports robust accuracy
    state = torch.load(export)
    assert "fc.weight" in state and not any(k.startswith("backbone.") for k in state)


def test_eval_without_checkpoint_is_one_line(tmp_path):
    result = run_module("conadv.cli.evaluate", "--config", str(REPO / "configs/demo.yaml"),
                        "--checkpoint", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("conadv-eval: error: no checkpoint found")


def test_help_config_lists_every_knob():
    result = run_module("conadv.cli.train", "--help-config")
    assert result.returncode == 0
    assert "optim.lr = 0.1  # peak learning rate" in result.stdout


@pytest.mark.parametrize("world, expected", [
    ("64", "global batch 98304 = 256 per device x 64 ranks x 6 accumulation steps"),
    ("1024", "global batch 98304 = 96 per device x 1024 ranks x 1 accumulation steps"),
])
def test_dry_run_prints_the_batch_split_for_the_world_size(world, expected):
    result = run_module("conadv.cli.train", "--dry-run", "--config",
                        str(REPO / "configs/imagenet/resnet50_96k.yaml"), "data.root=/data",
                        "train.max_per_device_batch=256", WORLD_SIZE=world)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_dry_run_rejects_an_impossible_split():
    result = run_module("conadv.cli.train", "--dry-run", "--config",
                        str(REPO / "configs/imagenet/resnet50_96k.yaml"), "data.root=/data",
                        WORLD_SIZE="7")
    assert result.returncode == 2
    assert "not divisible by the world size 7" in result.stderr
