"""The ConAdv engine: staleness is what the config says, the attack reads only, resume is
exact."""

import copy
import json

import pytest
import torch
from torch import nn

from conadv.adversarial.attacks import AttackSpec, perturb
from conadv.models import build_model
from conadv.models.multi_bn import (
    MultiBatchNorm2d,
    bn_views,
    convert_to_multi_bn,
    main_state_dict,
)
from conadv.optim.param_groups import split_decay_groups
from conadv.randomness import attack_seed
from conadv.train.job import train
from conadv.train.trainer import Trainer
from tests.helpers import (
    CPU,
    SINGLE,
    assert_same_run_state,
    checkpoint_state,
    tiny_config,
)


def make_trainer(run_dir, *overrides) -> Trainer:
    return Trainer(tiny_config(run_dir, "adv.enabled=true", *overrides), SINGLE, CPU)


def record_inputs(trainer: Trainer) -> list:
    """Wrap engine.take so the test sees every micro-batch the model trains on."""
    taken = []
    original = trainer.engine.take

    def take():
        inputs = original()
        taken.append(inputs)
        return inputs

    trainer.engine.take = take
    return taken


def adv_view(inputs) -> torch.Tensor:
    start = 0
    for view, rows, _ in inputs.views:
        if view == "adv":
            return inputs.images[start:start + rows]
        start += rows
    raise AssertionError("no adversarial view")


@pytest.mark.parametrize("tau, accumulation", [(1, 1), (2, 1), (2, 2)])
def test_adversarial_examples_are_made_with_the_weights_of_step_t_minus_tau(tmp_path, tau,
                                                                            accumulation):
    trainer = make_trainer(tmp_path, f"adv.tau={tau}", f"train.accumulation={accumulation}",
                           "train.max_steps=6")
    taken = record_inputs(trainer)
    weights = []  # weights[t] = the parameters step t starts from
    for _ in range(6):
        weights.append(copy.deepcopy(trainer.model.state_dict()))
        trainer.train_step()
    assert len(taken) == 6 * accumulation

    replica = copy.deepcopy(trainer.model)

    def attack_with(step_weights, inputs):
        """The published attack (written in this test) with the adversarial BatchNorm's batch
        statistics, seeded by the batch's global key."""
        replica.load_state_dict(step_weights)
        clean = inputs.images[:inputs.labels.shape[0]]
        with bn_views(replica, [("adv", clean.shape[0])], update_stats=False):
            adv, _ = published_attack(replica, clean, inputs.labels, 10, torch.Generator()
                                      .manual_seed(attack_seed(trainer.cfg.train.seed,
                                                               inputs.key)))
        return adv

    stale_differs = False
    for index, inputs in enumerate(taken):
        step = index // accumulation
        source = max(step - tau, 0)  # steps 0..tau use the initial weights (documented)
        assert inputs.source_step == source
        expected = attack_with(weights[source], inputs)
        torch.testing.assert_close(adv_view(inputs), expected, rtol=0, atol=1e-6,
                                   msg=f"step {step}")
        if step >= tau:
            fresh = attack_with(weights[step], inputs)
            stale_differs |= (fresh - expected).abs().max() > 1e-3
    assert stale_differs  # with fresh weights the examples would differ: staleness is real


def test_tau_zero_equals_a_hand_written_sequential_fgsm_step(tmp_path):
    overrides = ["adv.tau=0", "adv.aux_bn=false", "adv.random_start_prob=0",
                 "adv.targeted=false", "train.max_steps=1", "optim.weight_decay=1e-3",
                 "schedule.warmup_epochs=0"]
    trainer = make_trainer(tmp_path, *overrides)
    taken = record_inputs(trainer)
    model = copy.deepcopy(trainer.model)  # the weights of step 0
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert trainer.schedule(0) > 0
    trainer.train_step()
    x, y = taken[0].images[:32], taken[0].labels
    eps = trainer.cfg.adv.epsilon

    # by hand: FGSM with batch statistics, then one SGD step on mean(clean CE, adversarial CE)
    attacker = copy.deepcopy(model).train()
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(attacker(x_req), y), x_req)
    x_adv = (x + eps * grad.sign()).clamp(0, 1)
    assert torch.equal(x_adv, adv_view(taken[0]))

    optimizer = torch.optim.SGD(split_decay_groups(model.named_parameters(), 1e-3),
                                lr=trainer.schedule(0), momentum=0.9)
    logits = model(torch.cat([x, x_adv]))
    loss = (nn.functional.cross_entropy(logits[:32], y)
            + nn.functional.cross_entropy(logits[32:], y)) / 2
    loss.backward()
    optimizer.step()
    moved = False
    for (name, ours), theirs in zip(trainer.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
        moved |= not torch.equal(ours, initial[name])
    assert moved


def test_attack_leaves_weights_grads_buffers_and_optimizer_state_untouched(tmp_path):
    trainer = make_trainer(tmp_path, "train.max_steps=3")
    for _ in range(2):
        trainer.train_step()
    batch, key = trainer.stream.next()
    images = batch["image"].float() / 255
    # give every parameter a gradient, as in the middle of an accumulation
    with bn_views(trainer.model, [("main", 16), ("adv", 16)]):
        trainer.model(images).sum().backward()
    before = {
        "state": copy.deepcopy(trainer.model.state_dict()),
        "grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters()},
        "optim": copy.deepcopy(trainer.optimizer.state_dict()),
    }
    trainer.engine.make_adversarial(trainer.model, images, batch["label"], key)
    after = trainer.model.state_dict()
    for name, value in before["state"].items():
        assert torch.equal(value, after[name]), name  # includes every BN running statistic
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.grad, before["grads"][name]), name
    optim_after = trainer.optimizer.state_dict()
    for pid, state in before["optim"]["state"].items():
        for field, value in state.items():
            assert torch.equal(optim_after["state"][pid][field], value)


def published_attack(model, x, y, num_classes, generator, eps=9 / 255, step=9 / 255,
                     steps=1, start_prob=0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """The released ConAdv attack written from its description, independently of
    conadv/adversarial/attacks.py: a target drawn uniformly among the wrong labels,
    y_t = (y + o) mod C with o in {1, ..., C-1}; a uniform start in [-eps, eps] with
    probability 0.8 (else the clean image), clipped to [0, 1]; then
    x_{i+1} = clip_[0,1](clip_{x, eps}(x_i - step * sign(grad_x CE(f(x_i), y_t)))).
    The random numbers are drawn in the order the project documents (offsets, noise, coins),
    so the result can be compared exactly. Returns (adversarial images, targets)."""
    n = x.shape[0]
    offsets = torch.randint(1, num_classes, (n,), generator=generator)
    noise = torch.rand(x.shape, generator=generator)
    coins = torch.rand((n, 1, 1, 1), generator=generator)
    targets = (y + offsets) % num_classes
    start = torch.where(coins < start_prob, (2 * noise - 1) * eps, torch.zeros_like(x))
    adv = (x + start).clamp(0, 1)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(adv), targets)  # the mean: same sign
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() - step * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv, targets


def test_the_training_attack_is_the_published_one():
    torch.manual_seed(0)
    model = build_model(tiny_config("x").model, 10).eval()
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    for steps in (1, 3):
        spec = AttackSpec(epsilon=9 / 255, step_size=9 / 255 if steps == 1 else 3 / 255,
                          steps=steps, random_start_prob=0.8)
        ours = perturb(model, x, y, spec, 10, torch.Generator().manual_seed(5))
        theirs, targets = published_attack(model, x, y, 10, torch.Generator().manual_seed(5),
                                           step=spec.step_size, steps=steps)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert (ours - x).abs().max() <= 9 / 255 + 1e-6 and ours.min() >= 0 and ours.max() <= 1
    assert (targets != y).all()
    # the step moves toward the target: its loss falls for most images
    before = nn.functional.cross_entropy(model(x), targets, reduction="none")
    after = nn.functional.cross_entropy(model(theirs), targets, reduction="none")
    assert (after < before).float().mean() > 0.9
    # about 20% start from the clean image: the starts differ from x exactly there
    starts = perturb(model, x, y, AttackSpec(steps=1, step_size=1e-12), 10,
                     torch.Generator().manual_seed(5))
    clean = ((starts - x).abs().flatten(1).max(dim=1).values < 1e-9).float().mean()
    assert 0.05 < clean < 0.4


def test_the_target_draw_covers_every_wrong_label_and_never_the_true_one():
    from conadv.adversarial.attacks import draw

    draws = draw(torch.Size((20000, 1, 1, 1)), 10, torch.Generator().manual_seed(0),
                 torch.device("cpu"))
    counts = torch.bincount(draws.offsets, minlength=10)
    assert counts[0] == 0 and (counts[1:] > 20000 / 9 * 0.9).all()  # uniform over 1..9


def test_a_pure_function_of_weights_images_labels_and_seed():
    torch.manual_seed(0)
    model = build_model(tiny_config("x").model, 10).eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    spec = AttackSpec(epsilon=8 / 255, step_size=2 / 255, steps=5, random_start_prob=1.0)
    adv = perturb(model, x, y, spec, 10, torch.Generator().manual_seed(3))
    assert torch.equal(adv, perturb(model, x, y, spec, 10, torch.Generator().manual_seed(3)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = perturb(model, x, y, spec, 10, torch.Generator().manual_seed(3))
    assert low.dtype == torch.float32


def test_untargeted_attacks_lower_accuracy_and_pgd_at_least_as_much_as_fgsm(tmp_path):
    summary = train(tiny_config(tmp_path, "train.epochs=2", "eval.robust=true",
                                "eval.epsilon=0.03", "eval.step_size=0.01",
                                "train.deterministic=false"))
    final = summary["final_eval"]
    assert final["pgd10_top1"] <= final["fgsm_top1"] < final["top1"]


def test_multi_batchnorm_routes_slices_to_their_own_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    multi = MultiBatchNorm2d.from_batchnorm(bn, ["adv"])
    with torch.no_grad():
        multi.aux["adv"].weight.fill_(2.0)
    main_ref, adv_ref = copy.deepcopy(bn), copy.deepcopy(multi.aux["adv"])
    x = torch.randn(6, 4, 3, 3)
    holder = nn.Sequential(multi)
    with bn_views(holder, [("main", 2), ("adv", 4)]):
        out = holder(x)
    torch.testing.assert_close(out, torch.cat([main_ref(x[:2]), adv_ref(x[2:])]))
    torch.testing.assert_close(multi.running_mean, main_ref.running_mean)
    torch.testing.assert_close(multi.aux["adv"].running_var, adv_ref.running_var)

    frozen = copy.deepcopy(multi.state_dict())
    with bn_views(holder, [("adv", 6)], update_stats=False):
        holder(x)
    for key, value in multi.state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_converted_model_exports_and_loads_plain_torchvision(tmp_path):
    import torchvision

    model = build_model(tiny_config(tmp_path, "model.arch=resnet18").model, 10)
    convert_to_multi_bn(model, ["adv", "aug"])
    assert any(".aux.adv." in k for k in model.state_dict())
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(main_state_dict(model.backbone.state_dict()), strict=True)


def test_source_step_in_metrics_is_step_minus_tau(tmp_path):
    train(tiny_config(tmp_path, "adv.enabled=true", "adv.tau=2", "train.max_steps=7",
                      "train.deterministic=false"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["adv_source_step"] for r in records if r["kind"] == "train"}
    assert sorted(steps) == list(range(1, 8))
    for step, source in steps.items():
        assert source == (step - 2 if step > 2 else 1)
    for key in ("clean_loss", "adv_loss", "adv_success", "attack_time"):
        assert key in records[0]


@pytest.mark.parametrize("stop_at, accumulation", [(1, 1), (4, 1), (3, 2)])
def test_stop_and_resume_mid_epoch_with_tau_two_is_bit_identical(tmp_path, stop_at,
                                                                 accumulation):
    """Including a stop inside the first tau steps, where queued attacks share step 0's
    weights; the queue is rebuilt from saved weights, not restored from saved images."""
    run = ["adv.enabled=true", "adv.tau=2", "train.max_steps=7", "checkpoint.every_steps=100",
           f"train.accumulation={accumulation}"]
    straight = train(tiny_config(tmp_path / "straight", *run))
    train(tiny_config(tmp_path / "split", *run, f"train.stop_at_step={stop_at}"))
    resumed = train(tiny_config(tmp_path / "split", *run, "checkpoint.resume=auto"))
    assert resumed["resumed_from"].endswith(f"step-{stop_at:08d}")
    assert_same_run_state(checkpoint_state(tmp_path / "straight"),
                          checkpoint_state(tmp_path / "split"))
    assert straight["final_eval"] == resumed["final_eval"]


def test_three_views_with_their_own_batchnorm_train_and_resume(tmp_path):
    """clean + AutoAugment view + adversarial view, each with its BatchNorm (as released)."""
    from tests.helpers import jpeg_folder

    jpeg_folder(tmp_path / "data")
    run = ["data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.augment=autoaugment",
           "data.second_view=true", "adv.enabled=true", "adv.tau=1", "train.global_batch=4",
           "train.max_steps=4", "data.eval_resize=32", "checkpoint.every_steps=100"]
    trainer = make_trainer(tmp_path / "run", *run)
    taken = record_inputs(trainer)
    trainer.train_step()
    assert [view for view, _, _ in taken[0].views] == ["clean", "aug", "adv"]
    layer = next(m for m in trainer.model.modules() if isinstance(m, MultiBatchNorm2d))
    with trainer.engine.forward_context(taken[0]):
        assert layer.plan == [("main", 4), ("aug", 4), ("adv", 4)]
    assert any(".aux.aug." in k for k in trainer.model.state_dict())

    straight = train(tiny_config(tmp_path / "a", "adv.enabled=true", *run))
    train(tiny_config(tmp_path / "b", "adv.enabled=true", *run, "train.stop_at_step=2"))
    resumed = train(tiny_config(tmp_path / "b", "adv.enabled=true", *run,
                                "checkpoint.resume=auto"))
    assert straight["final_eval"] == resumed["final_eval"]
    assert_same_run_state(checkpoint_state(tmp_path / "a"), checkpoint_state(tmp_path / "b"))


def test_a_queue_whose_snapshots_miss_parameters_is_refilled_not_half_loaded(tmp_path, caplog):
    """adv.aux_bn switched off on resume: the saved weights of the source steps hold the
    auxiliary BatchNorm's parameters, which this model no longer has; replaying attacks from
    them would silently mix saved and current weights."""
    run = ["adv.enabled=true", "adv.tau=2"]
    train(tiny_config(tmp_path, *run, "train.max_steps=3"))
    resumed = train(tiny_config(tmp_path, *run, "adv.aux_bn=false", "train.max_steps=5",
                                "checkpoint.resume=auto", "checkpoint.allow_config_change=true"))
    assert resumed["steps"] == 5
    assert "ConAdv weight snapshots are for other parameters" in caplog.text
