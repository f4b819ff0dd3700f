"""LARS and LAMB against timm (test-only peer) and an independent MLPerf-formula loop."""

import copy
import math

import pytest
import timm.optim
import torch
from torch import nn

from conadv.config import OptimConfig, ScheduleConfig
from conadv.errors import ConfigError
from conadv.optim import LAMB, LARS, WarmupDecay, build_optimizer, build_scheduler, scaled_lr
from conadv.optim.cpu_kernels import lamb_kernel
from conadv.optim.param_groups import split_decay_groups

STEPS = 25


def make_params(dtype: torch.dtype) -> list[torch.Tensor]:
    """Conv, matrix, vectors, and a zero tensor (its weight norm is 0: ratio must be 1)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (10, 32), (32,), (10,), (4, 4)]
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    with torch.no_grad():
        params[-1].zero_()
    return params


def groups_of(params: list[torch.Tensor], wd: float = 0.01, adapt_skip: bool = False,
              extra: dict | None = None) -> list[dict]:
    """Three groups: decayed weights, decayed zero tensor, and a wd=0 BN/bias-like group."""
    extra = extra or {}
    return [{"params": [params[0], params[1]], "weight_decay": wd, **extra},
            {"params": [params[4]], "weight_decay": wd / 2, **extra},
            {"params": [params[2], params[3]], "weight_decay": 0.0,
             **({"always_adapt": True, "adapt": True} if adapt_skip else {}), **extra}]


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = STEPS,
        lr_at=None) -> None:
    """Gradients that depend on the parameters (like a real loss) plus seeded noise; a step
    where one tensor's gradient is exactly zero; optional per-step learning rates."""
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = 0.1 * noise + 0.05 * p.detach()
            if step == 3 and i == 1:
                p.grad.zero_()
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        optimizer.step()


def tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


def assert_params_close(ours, theirs, dtype):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), **tolerance(dtype))


def moved(params, reference) -> float:
    return max((p.detach() - r).abs().max().item() for p, r in zip(params, reference))


DTYPES = [torch.float64, torch.float32]


# --------------------------------------------------------------------------- LAMB vs timm

# timm clips gradients at global norm 1.0 unless told otherwise
NO_CLIP = {"max_grad_norm": None}
LAMB_CASES = {
    "default": ({}, NO_CLIP),
    "trust_clip": ({"trust_clip": True}, {"trust_clip": True, **NO_CLIP}),
    "decoupled": ({"decoupled_decay": True}, {"decoupled_decay": True, **NO_CLIP}),
    "no_grad_averaging": ({"grad_averaging": False}, {"grad_averaging": False, **NO_CLIP}),
    "clip_grad_norm": ({"max_grad_norm": 0.5}, {"max_grad_norm": 0.5}),
}


# the fused CPU kernel (cpu_kernel=True) and the fused-Adam + foreach path used on CUDA
PATHS = [pytest.param(True, id="cpu_kernel"), pytest.param(False, id="foreach")]


def require_kernel(cpu_kernel: bool) -> None:
    if cpu_kernel and lamb_kernel() is None:
        pytest.skip("the fused CPU LAMB kernel cannot be built here (no C++ compiler or ninja)")


@pytest.mark.parametrize("cpu_kernel", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LAMB_CASES))
def test_lamb_equals_timm(case, dtype, cpu_kernel):
    require_kernel(cpu_kernel)
    ours_kw, timm_kw = LAMB_CASES[case]
    ours_p, timm_p = make_params(dtype), make_params(dtype)
    start = [p.detach().clone() for p in ours_p]
    ours = LAMB(groups_of(ours_p), lr=0.02, cpu_kernel=cpu_kernel, **ours_kw)
    theirs = timm.optim.Lamb(groups_of(timm_p), lr=0.02, foreach=False, **timm_kw)
    schedule = lambda s: 0.02 * (1 + s) / STEPS  # noqa: E731 (a changing LR)
    run(ours, ours_p, lr_at=schedule)
    run(theirs, timm_p, lr_at=schedule)
    assert_params_close(ours_p, timm_p, dtype)
    assert moved(ours_p, start) > 1e-3  # the comparison is not between two idle optimizers


@pytest.mark.parametrize("cpu_kernel", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lamb_always_adapt_group_equals_timm(dtype, cpu_kernel):
    require_kernel(cpu_kernel)
    ours_p, timm_p = make_params(dtype), make_params(dtype)
    ours = LAMB(groups_of(ours_p, adapt_skip=True), lr=0.01, cpu_kernel=cpu_kernel)
    theirs = timm.optim.Lamb(groups_of(timm_p, adapt_skip=True), lr=0.01, **NO_CLIP)
    run(ours, ours_p)
    run(theirs, timm_p)
    assert_params_close(ours_p, timm_p, dtype)


# --------------------------------------------------------------------------- LARS vs timm

LARS_CASES = {
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "no_momentum": {"momentum": 0.0},
    "trust_clip": {"momentum": 0.9, "trust_clip": True},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LARS_CASES))
def test_lars_equals_timm(case, dtype):
    kw = LARS_CASES[case]
    ours_p, timm_p = make_params(dtype), make_params(dtype)
    start = [p.detach().clone() for p in ours_p]
    ours = LARS(groups_of(ours_p, wd=1e-3), lr=2.0, trust_coeff=0.01, eps=1e-8, **kw)
    theirs = timm.optim.Lars(groups_of(timm_p, wd=1e-3), lr=2.0, trust_coeff=0.01, eps=1e-8,
                             foreach=False, **kw)
    schedule = lambda s: 2.0 * (1 + s) / STEPS  # noqa: E731
    run(ours, ours_p, lr_at=schedule)
    run(theirs, timm_p, lr_at=schedule)
    assert_params_close(ours_p, timm_p, dtype)
    assert moved(ours_p, start) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_lars_always_adapt_equals_timm(dtype):
    ours_p, timm_p = make_params(dtype), make_params(dtype)
    ours = LARS(groups_of(ours_p, adapt_skip=True), lr=1.0, momentum=0.9)
    theirs = timm.optim.Lars(groups_of(timm_p, adapt_skip=True), lr=1.0, momentum=0.9)
    run(ours, ours_p)
    run(theirs, timm_p)
    assert_params_close(ours_p, timm_p, dtype)


# --------------------------------------------------------------------------- LARS vs MLPerf


def mlperf_lars_reference(model: nn.Module, lr: float, momentum: float, wd: float, eeta: float,
                          eps: float, grads_per_step: list[dict[str, torch.Tensor]]) -> None:
    """Written from the MLPerf ResNet-50 LARS formulas, one tensor at a time: names containing
    'bn' (batch_normalization) or 'bias' are skipped (no decay, no trust ratio); the momentum
    keeps lr inside (v <- m v + lr r (g + wd w); w <- w - v), equal to lr-outside for a
    constant LR."""
    velocity = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    with torch.no_grad():
        for grads in grads_per_step:
            for name, w in model.named_parameters():
                g = grads[name]
                if "bn" in name or "bias" in name:
                    scaled_lr = lr
                    update = g
                else:
                    w_norm, g_norm = torch.norm(w), torch.norm(g)
                    if w_norm > 0 and g_norm > 0:
                        trust = eeta * w_norm / (g_norm + wd * w_norm + eps)
                    else:
                        trust = torch.tensor(1.0, dtype=w.dtype)
                    scaled_lr = lr * trust
                    update = g + wd * w
                velocity[name] = momentum * velocity[name] + scaled_lr * update
                w -= velocity[name]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lars_skip_list_equals_mlperf_loop(dtype):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 8, 3))
    model.add_module("bn", nn.BatchNorm2d(8))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(8 * 4 * 4, 5))
    model = model.to(dtype)
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3, 6, 6, dtype=dtype)
    y = torch.randint(0, 5, (6,))

    cfg = OptimConfig(name="lars", momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02,
                      eps=1e-9)
    optimizer = build_optimizer(model.named_parameters(), cfg, lr=3.0)
    recorded = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        recorded.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        optimizer.step()
    # replay the same gradients through the reference, step by step, from the same start
    # (the gradients of step k depend on the weights of step k, which agree if all is right)
    mlperf_lars_reference(reference, 3.0, 0.9, 5e-4, 0.02, 1e-9, recorded)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, **tolerance(dtype), msg=name)


# --------------------------------------------------------------------------- behaviour

OPTIMIZERS = {
    "lars": lambda groups: LARS(groups, lr=1.0, momentum=0.9),
    "lamb": lambda groups: LAMB(groups, lr=0.01, max_grad_norm=1.0),
    "lamb_foreach": lambda groups: LAMB(groups, lr=0.01, max_grad_norm=1.0, cpu_kernel=False),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_scaler_inf_step_changes_nothing(name):
    params = make_params(torch.float32)
    optimizer = OPTIMIZERS[name](groups_of(params))
    run(optimizer, params, steps=3)
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(optimizer.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = sum((p * p).sum() for p in params)
    scaler.scale(loss).backward()
    params[1].grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 512.0
    for a, b in zip(params, before_params):
        assert torch.equal(a.detach(), b)
    after = optimizer.state_dict()["state"]
    for key, state in before_state["state"].items():
        for field, value in state.items():
            assert torch.equal(after[key][field], value), (key, field)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    params = make_params(torch.float32)
    optimizer = OPTIMIZERS[name](groups_of(params))
    run(optimizer, params, steps=5)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(optimizer.state_dict())
    run(optimizer, params, steps=7)
    continued = [p.detach().clone() for p in params]

    clone = [p.clone().detach().requires_grad_() for p in saved_params]
    fresh = OPTIMIZERS[name](groups_of(clone))
    fresh.load_state_dict(saved_state)
    run(fresh, clone, steps=7)
    for a, b in zip(continued, clone):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_add_param_group_and_torch_scheduler(name):
    params = make_params(torch.float32)
    *first, added = groups_of(params)
    optimizer = OPTIMIZERS[name](first)
    optimizer.add_param_group(added)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    lrs = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[1] == lrs[0] / 2 and lrs[3] == lrs[0] / 4
    assert len(optimizer.param_groups) == 3
    assert all(optimizer.state[p] for p in added["params"])  # the added group was stepped


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_makes_no_host_synchronisation(name):
    """Reading a device value on the host (item, bool, tolist, numpy, cpu, nonzero, equal,
    printing...) would sync a GPU; the CPU's stand-in for set_sync_debug_mode sees them all."""
    from tests.stream_order import checked_streams

    with checked_streams() as checker:
        params = make_params(torch.float32)
        optimizer = OPTIMIZERS[name](groups_of(params))
        run(optimizer, params, steps=1)
        for p in params:
            p.grad = torch.ones_like(p)
        with checker.no_host_sync():
            optimizer.step()
            optimizer.step()
    assert checker.host_reads == []


def test_factory_groups_follow_the_skip_list():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = split_decay_groups(model.named_parameters(), weight_decay=1e-4)
    assert [len(g["params"]) for g in groups] == [2, 4]  # conv.w, fc.w | conv.b, bn.w, bn.b, fc.b
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["adapt"] is False
    lamb = build_optimizer(model.named_parameters(), OptimConfig(name="lamb", always_adapt=True),
                           lr=0.1)
    assert isinstance(lamb, LAMB) and all(g["adapt"] for g in lamb.param_groups)


def test_apex_backend_missing_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import apex.optimizers  # noqa: F401
        pytest.skip("apex is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="needs NVIDIA apex, which is not installed"):
        build_optimizer(nn.Linear(2, 2).named_parameters(),
                        OptimConfig(name="lamb", backend="apex"), lr=0.1)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("decay", ["poly", "cosine"])
def test_schedule_values_match_the_formulas(decay):
    peak, end, start, warmup, total, power = 29.0, 1e-4, 0.5, 18, 100, 2.0
    s = WarmupDecay(peak, total, warmup, start, decay, power, end)

    def expected_decay(step):
        p = (step - warmup) / (total - 1 - warmup)
        shape = (1 - p) ** power if decay == "poly" else 0.5 * (1 + math.cos(math.pi * p))
        return end + (peak - end) * shape

    assert s(0) == pytest.approx(start)
    assert s(9) == pytest.approx(start + (peak - start) * 9 / 18)
    assert s(warmup) == pytest.approx(peak)  # end of warm-up
    mid = warmup + (total - 1 - warmup) // 2
    assert s(mid) == pytest.approx(expected_decay(mid))
    assert s(total - 1) == pytest.approx(end)  # last step


def test_scheduler_drives_any_optimizer_per_step():
    params = make_params(torch.float32)
    optimizer = LARS(groups_of(params), lr=0.0)
    cfg = ScheduleConfig(warmup_epochs=2, decay="poly", poly_power=2.0, end_lr=0.0)
    scheduler, schedule = build_scheduler(optimizer, cfg, peak_lr=8.0, steps_per_epoch=5,
                                          total_steps=30)
    seen = []
    for _ in range(30):
        seen.append(optimizer.param_groups[0]["lr"])
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([schedule(s) for s in range(30)])
    assert seen[0] == 0.0 and seen[10] == pytest.approx(8.0) and seen[-1] == pytest.approx(0.0)


def test_step_decay_equals_torch_multisteplr():
    """decay=step (MEAL V2's recipe: x0.1 at epoch 100) against torch's own MultiStepLR."""
    params = make_params(torch.float32)
    ours = torch.optim.SGD(params, lr=0.0)
    cfg = ScheduleConfig(decay="step", step_epochs=[2.0, 5.0], step_factor=0.1)
    scheduler, _ = build_scheduler(ours, cfg, peak_lr=0.01, steps_per_epoch=4, total_steps=30)
    theirs = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    reference = torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=[8, 20], gamma=0.1)
    for _ in range(30):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"],
                                                           rel=1e-12)
        ours.step()  # the order of a training step: optimizer, then schedule
        scheduler.step()
        theirs.step()
        reference.step()
    assert ours.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_lr_scaling_rules():
    assert scaled_lr(0.1, "linear", 4096, 256) == pytest.approx(1.6)
    assert scaled_lr(1e-3, "sqrt", 16384, 256) == pytest.approx(8e-3)
    assert scaled_lr(5.0, "none", 98304, 256) == 5.0


def test_cpu_kernel_handles_channels_last_weights():
    require_kernel(True)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, 3, 3, generator=gen)
    dense = weight.clone().requires_grad_()
    strided = weight.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(weight.shape, generator=gen)
    optimizers = [LAMB([dense], lr=0.1), LAMB([strided], lr=0.1)]
    for _ in range(3):
        dense.grad = grad.clone()
        strided.grad = grad.clone().contiguous(memory_format=torch.channels_last)
        for optimizer in optimizers:
            optimizer.step()
    assert strided.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dense.detach(), strided.detach(), rtol=1e-6, atol=1e-7)
