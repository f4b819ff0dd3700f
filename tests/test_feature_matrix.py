"""The feature matrix under the stand-in streams: every training mode runs its CUDA path (the
stream executor, the stop agreement's pinned flag, the attack ranks' receives) under the
ordering checker of tests/stream_order.py and must give the sequential executor's numbers bit
for bit. A mode that passes only in the combinations someone listed is how a user's first GPU
step crashed (attack ranks with the stream executor).

Covered elsewhere, with the checker on: ConAdv tau 0/1/2 with accumulation 2 and resumes
inside and after the first tau steps, the teachers with the discriminator (with and without
ConAdv), DALI batches (tests/test_stream_order.py); attack ranks with tau 1, and with tau 2
stopped inside its first tau steps and resumed, through torchrun with every rank checked
(tests/test_attack_ranks.py).

Combinations the config refuses in one sentence (tested at the bottom): MixUp/CutMix with
ConAdv (the adversarial view has hard labels), attack ranks without staleness (tau 0 or
vanilla), the stream executor without a device that has streams."""

from __future__ import annotations

import pytest

from conadv.config import load_config
from conadv.errors import ConfigError
from conadv.train.job import train
from tests.helpers import (
    TINY,
    assert_same_run_state,
    checkpoint_state,
    tiny_config,
)
from tests.stream_order import checked_streams

CONADV = ["adv.enabled=true", "adv.tau=1"]
MODES: dict[str, list[str]] = {
    "vanilla": ["adv.enabled=false"],
    "vanilla-autoaugment-view-mixup-cutmix": [
        "adv.enabled=false", "data.augment=autoaugment", "data.second_view=true",
        "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0"],
    "conadv-autoaugment-view": [*CONADV, "data.augment=autoaugment", "data.second_view=true"],
    "conadv-weight-ema": [*CONADV, "train.ema_decay=0.9"],
    "conadv-bf16-autocast": [*CONADV, "train.precision=bf16"],
    "conadv-fp16-autocast": [*CONADV, "train.precision=fp16"],
    # a term across views, with accumulation (the objective sees each micro-batch's views)
    "conadv-trades-accumulation": [*CONADV, "adv.trades_beta=6", "train.accumulation=2"],
    # the skip policy's flat snapshots with channels-last weights (their strides kept)
    "conadv-skip-channels-last": [*CONADV, "train.on_nonfinite=skip", "model.channels_last=true"],
}


def _run(run_dir, executor: str, *overrides: str) -> dict:
    cfg = tiny_config(run_dir, f"adv.executor={executor}", "train.max_steps=3", *overrides)
    if executor == "sequential":
        return train(cfg)
    with checked_streams(watch_host_reads=False) as checker, checker.host_data():
        return train(cfg)


def _counted_compute(overrides: list[str], steps: int = 3, batch: int = 32) -> dict:
    """The compute a mode's run must count, written out from its views: the clean one, the
    augmented one, the adversarial one (one FGSM step per image, adv.steps' default)."""
    adversarial = "adv.enabled=true" in overrides
    views = 1 + ("data.second_view=true" in overrides) + adversarial
    train_images, attack = steps * batch * views, steps * batch * adversarial
    return {"train_images": train_images, "attack_image_steps": attack, "teacher_images": 0,
            "counted_from_step": 0, "forward_equivalents": 3 * train_images + 2 * attack}


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_keeps_the_stream_rules_and_the_sequential_numbers(tmp_path, mode):
    overrides = MODES[mode]
    stream = _run(tmp_path / "stream", "stream", *overrides)
    sequential = _run(tmp_path / "sequential", "sequential", *overrides)
    assert_same_run_state(checkpoint_state(tmp_path / "sequential"),
                          checkpoint_state(tmp_path / "stream"))
    # the compute counted is the mode's, whichever executor ran it and however it is split
    assert stream["compute"] == sequential["compute"] == _counted_compute(overrides)


def test_a_skipped_non_finite_step_keeps_the_stream_rules(tmp_path):
    """on_nonfinite=skip with a NaN loss at step 2: the guard restores the weights while the
    next attack may read them."""
    from tests.helpers import poison_loss_at

    skipped = []
    for executor in ("stream", "sequential"):
        with pytest.MonkeyPatch.context() as patch:
            poison_loss_at(patch, {1})
            summary = _run(tmp_path / executor, executor, *CONADV, "train.on_nonfinite=skip",
                           "train.max_steps=4")
        skipped.append(summary["skipped_steps"])
    assert skipped == [1, 1]
    assert_same_run_state(checkpoint_state(tmp_path / "sequential"),
                          checkpoint_state(tmp_path / "stream"))


@pytest.mark.slow
def test_compiled_conadv_keeps_the_stream_rules(tmp_path, monkeypatch):
    """train.compile on dynamo's graphs (aot_eager: inductor's C++ build takes minutes here)."""
    import functools

    import torch
    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    _run(tmp_path / "stream", "stream", *CONADV, "train.compile=true",
         "train.deterministic=false")


@pytest.mark.parametrize("overrides, message", [
    (["adv.enabled=true", "train.mixup_alpha=0.2"], "must be 0 with adv.enabled"),
    (["adv.enabled=true", "adv.tau=0", "adv.attack_ranks=1"], "needs ConAdv with adv.tau >= 1"),
])
def test_combinations_that_cannot_work_are_refused_in_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*TINY, *overrides])


def test_the_stream_executor_without_streams_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="adv.executor=stream needs a CUDA device"):
        train(tiny_config(tmp_path, "adv.enabled=true", "adv.executor=stream"))
