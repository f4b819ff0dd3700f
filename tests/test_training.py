"""The training loop end to end on the digits data, in-process: resume, checkpoints, export."""

import json
import logging

import pytest
import torch
import torchvision

from conadv.checkpoints.format import problem
from conadv.models import build_model, export_state_dict
from conadv.train.checkpoint import CheckpointManager
from conadv.train.job import train
from tests.helpers import assert_same_run_state, checkpoint_state, newest_checkpoint, tiny_config

# mid-epoch (44 batches of 32 per epoch), with augmentation and mixup so RNG state matters
RESUME_RUN = ["train.max_steps=8", "train.mixup_alpha=0.4", "checkpoint.every_steps=100"]


def test_stop_and_resume_is_bit_identical(tmp_path):
    straight = train(tiny_config(tmp_path / "straight", *RESUME_RUN))
    assert straight["finished"] and straight["steps"] == 8

    first = train(tiny_config(tmp_path / "split", *RESUME_RUN, "train.stop_at_step=3"))
    assert not first["finished"] and first["steps"] == 3
    second = train(tiny_config(tmp_path / "split", *RESUME_RUN, "checkpoint.resume=auto"))
    assert second["resumed_from"].endswith("step-00000003") and second["finished"]

    assert_same_run_state(checkpoint_state(tmp_path / "straight"),
                          checkpoint_state(tmp_path / "split"))
    assert straight["final_eval"] == second["final_eval"]


def test_the_resume_comparison_fails_when_a_resume_is_one_batch_off(tmp_path, monkeypatch):
    """Guard for the test above: a resume that repeats one step's batches is caught."""
    from conadv.data.loader import BatchStream

    train(tiny_config(tmp_path / "straight", *RESUME_RUN))
    train(tiny_config(tmp_path / "split", *RESUME_RUN, "train.stop_at_step=3"))
    seek = BatchStream.seek
    monkeypatch.setattr(BatchStream, "seek", lambda self, step: seek(self, max(step - 1, 0)))
    train(tiny_config(tmp_path / "split", *RESUME_RUN, "checkpoint.resume=auto"))
    with pytest.raises(AssertionError):
        assert_same_run_state(checkpoint_state(tmp_path / "straight"),
                              checkpoint_state(tmp_path / "split"))


@pytest.mark.parametrize("case", ["fp16", "epoch-2"])
def test_stop_and_resume_of_fp16_and_in_a_later_epoch_is_bit_identical(tmp_path, case):
    """fp16 saves the GradScaler's scale and growth tracker; a stop in the middle of epoch 2 of
    the torchvision path resumes the second epoch's permutation at the right place."""
    run = {"fp16": ["train.precision=fp16", "adv.enabled=true", "train.max_steps=6"],
           "epoch-2": ["train.global_batch=256", "train.max_steps=9"]}[case]  # 5 steps/epoch
    run += ["checkpoint.every_steps=100", "train.mixup_alpha=0.4" if case == "epoch-2" else
            "data.hflip=true"]
    straight = train(tiny_config(tmp_path / "straight", *run))
    train(tiny_config(tmp_path / "split", *run, "train.stop_at_step=7" if case == "epoch-2"
                      else "train.stop_at_step=3"))
    resumed = train(tiny_config(tmp_path / "split", *run, "checkpoint.resume=auto"))
    assert resumed["finished"] and straight["final_eval"] == resumed["final_eval"]
    a, b = checkpoint_state(tmp_path / "straight"), checkpoint_state(tmp_path / "split")
    if case == "fp16":
        assert a["scaler"]["scale"] > 0 and "_growth_tracker" in a["scaler"]
    assert_same_run_state(a, b)


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
    assert "checksum" in problem(newest)
    assert manager.choose_resume("auto").name == "step-00000001"


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
