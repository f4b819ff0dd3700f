"""The training loop end to end on the digits data, in-process: resume, checkpoints, export."""

import json
import logging

import pytest
import torch
import torchvision

from conadv.models import build_model, export_state_dict
from conadv.train.checkpoint import CheckpointManager
from conadv.train.trainer import train
from tests.helpers import checkpoint_state, newest_checkpoint, tiny_config

# mid-epoch (44 batches of 32 per epoch), with augmentation and mixup so RNG state matters
RESUME_RUN = ["train.max_steps=8", "train.mixup_alpha=0.4", "checkpoint.every_steps=100"]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


def test_stop_and_resume_is_bit_identical(tmp_path):
    straight = train(tiny_config(tmp_path / "straight", *RESUME_RUN))
    assert straight["finished"] and straight["steps"] == 8

    first = train(tiny_config(tmp_path / "split", *RESUME_RUN, "train.stop_at_step=3"))
    assert not first["finished"] and first["steps"] == 3
    second = train(tiny_config(tmp_path / "split", *RESUME_RUN, "checkpoint.resume=auto"))
    assert second["resumed_from"].endswith("step-00000003") and second["finished"]

    _assert_same_state(checkpoint_state(tmp_path / "straight"),
                       checkpoint_state(tmp_path / "split"))
    assert straight["final_eval"] == second["final_eval"]


def test_resume_changes_nothing_when_the_state_differs(tmp_path):
    """Guard for the test above: a different seed does give different weights."""
    train(tiny_config(tmp_path / "a", "train.max_steps=2"))
    train(tiny_config(tmp_path / "b", "train.max_steps=2", "train.seed=1"))
    a, b = checkpoint_state(tmp_path / "a"), checkpoint_state(tmp_path / "b")
    assert not torch.equal(a["model"]["backbone.fc.weight"], b["model"]["backbone.fc.weight"])


def test_truncated_newest_checkpoint_is_skipped(tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny_config(run, "train.max_steps=4", "checkpoint.every_steps=2"))
    newest = newest_checkpoint(run)
    assert newest.name == "step-00000004"
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING):
        resumed = train(tiny_config(run, "train.max_steps=4", "checkpoint.every_steps=2",
                                    "checkpoint.resume=auto"))
    assert resumed["resumed_from"].endswith("step-00000002")
    assert "skipping checkpoint" in caplog.text and "truncated" in caplog.text


def test_corrupt_checkpoint_with_the_same_size_is_detected(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "train.max_steps=2", "checkpoint.every_steps=1"))
    newest = newest_checkpoint(run)
    data = bytearray((newest / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "state.pt").write_bytes(bytes(data))
    manager = CheckpointManager(run / "checkpoints", keep_last=3)
    assert "checksum" in manager.problem(newest)
    assert manager.find_resume("auto").name == "step-00000001"


def test_keep_last_prunes_old_checkpoints_and_leaves_no_partial(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "train.max_steps=5", "checkpoint.every_steps=1",
                      "checkpoint.keep_last=2"))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000005"]


def test_run_directory_has_config_metrics_summary_and_events(tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(run, "train.max_steps=3", "log.tensorboard=true"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for key in ("epoch", "lr", "loss", "img_per_s", "data_time", "step_time"):
        assert key in train_records[0]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and {"top1", "top5"} <= set(evals[-1])
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"] == 3
    assert "per_device_batch: 32" in (run / "config.yaml").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_export_loads_into_plain_torchvision(tmp_path):
    cfg = tiny_config(tmp_path, "model.arch=resnet18", "model.zero_init_residual=true")
    model = build_model(cfg.model, num_classes=10)
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(export_state_dict(model), strict=True)
    model.eval()
    plain.eval()
    x = torch.rand(2, 3, 32, 32)
    normalized = (x - model.normalize.mean) / model.normalize.std
    torch.testing.assert_close(plain(normalized), model(x))


@pytest.mark.parametrize("arch", ["resnet18", "cifar_resnet"])
def test_channels_last_gives_the_same_logits(arch):
    cfg = tiny_config("unused", f"model.arch={arch}")
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10).eval()
    cfg.model.channels_last = True
    torch.manual_seed(0)
    fast = build_model(cfg.model, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), model(x),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision, scaled", [("fp16", True), ("bf16", False)])
def test_mixed_precision_trains_and_checkpoints_the_scaler(tmp_path, precision, scaled):
    summary = train(tiny_config(tmp_path, f"train.precision={precision}", "train.max_steps=3",
                                "train.deterministic=false"))
    assert summary["finished"]
    state = checkpoint_state(tmp_path)
    assert bool(state["scaler"]) == scaled  # fp16 needs a GradScaler; its state is saved
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_run_of_an_older_checkpoint_format_is_never_silently_restarted(tmp_path):
    from conadv.errors import CheckpointError

    old = tmp_path / "checkpoints" / "step-00000004"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text('{"step": 4, "world_size": 1, "files": {}}')
    with pytest.raises(CheckpointError, match="checkpoint format 1.*checkpoint.resume=none"):
        train(tiny_config(tmp_path, "train.max_steps=2", "checkpoint.resume=auto"))
