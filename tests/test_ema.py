"""Weight EMA against a reference written from its definition, over the main weights only."""

import copy

import pytest
import torch
from torch import nn

from conadv.models.multi_bn import convert_to_multi_bn
from conadv.train.ema import WeightEma, averaged_names


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    convert_to_multi_bn(model, ["adv"])
    return model


def _train_step(model: nn.Module, step: int) -> None:
    """A step that changes every parameter and the main BatchNorm's statistics."""
    model.train()
    generator = torch.Generator().manual_seed(step)
    loss = model(torch.randn(8, 3, 6, 6, generator=generator)).square().mean()
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 0.1 * parameter.grad
                parameter.grad = None
        for name, parameter in model.named_parameters():
            if ".aux." in name:  # as training the adversarial route would
                parameter += 0.5


@pytest.mark.parametrize("warmup, every", [(False, 1), (True, 1), (False, 2)])
def test_the_ema_is_the_average_written_by_hand_over_the_main_weights(warmup, every):
    model = _model()
    initial = copy.deepcopy(model.state_dict())
    ema = WeightEma(model, decay=0.9, every_steps=every, warmup=warmup)
    reference = {name: value.double().clone() for name, value in initial.items()}
    updates = 0
    for step in range(1, 7):
        _train_step(model, step)
        ema.after_optimizer_step(step)
        if step % every == 0:
            decay = min(0.9, 1 - (1 + updates) ** (-2 / 3)) if warmup else 0.9
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    reference[name] = decay * reference[name] + (1 - decay) * value.double()
                else:
                    reference[name] = value.double().clone()
            updates += 1
    averaged = set(averaged_names(model))
    assert averaged and not any(".aux." in name for name in averaged)
    assert {n for n in model.state_dict() if ".aux." not in n} == averaged
    got = ema.state_dict()["weights"]
    for name in model.state_dict():
        if name in averaged:
            torch.testing.assert_close(got[name].double(), reference[name], rtol=0, atol=1e-6,
                                       msg=name)
        else:  # the auxiliary BatchNorm is never averaged: it stays as it was copied
            assert torch.equal(ema.model.state_dict()[name], initial[name]), name
    assert ema.updates == 6 // every
    moved = (got["1.weight"].double() - initial["1.weight"].double()).abs().max()
    assert moved > 1e-3  # the test would see an EMA that never moves


def test_the_ema_state_round_trips_and_a_missing_entry_is_refused():
    model = _model()
    ema = WeightEma(model, decay=0.99, warmup=True)
    for step in range(1, 4):
        _train_step(model, step)
        ema.after_optimizer_step(step)
    state = ema.state_dict()
    restored = WeightEma(_model(), decay=0.99, warmup=True)
    restored.load_state_dict(state)
    assert restored.updates == 3 and restored.decay_now() == ema.decay_now()
    for name, value in state["weights"].items():
        assert torch.equal(restored.model.state_dict()[name], value)
    del state["weights"]["1.running_mean"]
    from conadv.errors import CheckpointError

    with pytest.raises(CheckpointError, match="lacks 1 entries"):
        restored.load_state_dict(state)


def test_training_with_an_ema_resumes_bit_identically_and_evaluates_it(tmp_path):
    """ConAdv with the EMA: stop and resume equal an uninterrupted run (the EMA included);
    ema_top1 is reported beside top1, and conadv-eval --ema gives the same numbers."""
    from conadv.train.eval_job import run_evaluation
    from conadv.train.job import train
    from tests.helpers import assert_same_run_state, checkpoint_state, tiny_config

    run = ["adv.enabled=true", "train.ema_decay=0.8", "train.ema_warmup=true",
           "train.max_steps=6", "checkpoint.every_steps=100"]
    straight = train(tiny_config(tmp_path / "a", *run))
    train(tiny_config(tmp_path / "b", *run, "train.stop_at_step=3"))
    resumed = train(tiny_config(tmp_path / "b", *run, "checkpoint.resume=auto"))
    state = checkpoint_state(tmp_path / "a")
    assert state["ema"]["updates"] == 6
    assert_same_run_state(state, checkpoint_state(tmp_path / "b"))
    assert resumed["final_eval"] == straight["final_eval"]
    final = straight["final_eval"]
    assert {"ema_top1", "ema_top5", "ema_loss"} <= set(final)
    assert final["ema_top1"] != final["top1"] or final["ema_loss"] != final["loss"]
    evaluated = run_evaluation(tiny_config(tmp_path / "a", *run), tmp_path / "a", ema=True)
    assert evaluated["top1"] == final["ema_top1"] and evaluated["weights"] == "ema"
