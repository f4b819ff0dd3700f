"""How flat is the minimum a model found: two measures of its training loss, in eval mode, on a
fixed subset of training images, over every parameter but the auxiliary BatchNorms' (which
only training's adversarial and augmented views use).

- `top_eigenvalue`: the Hessian's largest eigenvalue, by power iteration on Hessian-vector
  products (double backward; the Hessian is never built). Power iteration finds the eigenvalue
  of largest magnitude; where that one is negative (a saddle), a second iteration on the
  shifted Hessian H - lambda I finds the largest.
- `worst_case_increase`: the largest training loss within the box |delta_i| <= rho (|w_i| + 1)
  around the weights (Keskar et al., ICLR 2017, "On large-batch training...", eq. 3 with
  A = I), found by projected sign-gradient ascent from the box's centre (the first step is
  SAM's first-order worst case for this box; a gradient component that is exactly 0 steps
  up, so the ascent leaves a stationary point too); reported as the increase and as Keskar's
  100 (max - L) / (1 + L), and split into its first-order term rho sum |g_i| (|w_i| + 1), what
  the gradient alone would gain in the box, and the rest. The first-order term measures how
  far from a stationary point the weights are, not how curved the loss is: comparing minima
  by the second-order rest is fair even between runs that fit differently.

Both take `loss(parameters) -> scalar` and the list of parameters, so they can be checked on
problems whose answer is known.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from conadv.errors import TrainingDiverged

Loss = Callable[[], Tensor]
log = logging.getLogger(__name__)


def top_eigenvalue(loss: Loss, parameters: Sequence[Tensor], iterations: int = 50,
                   tolerance: float = 1e-4, seed: int = 0) -> float:
    """The largest eigenvalue of the Hessian of `loss` at `parameters`."""
    dominant = _power_iteration(loss, parameters, iterations, tolerance, seed, shift=0.0)
    if dominant >= 0:
        return dominant
    # H - dominant I has eigenvalues in [0, largest - dominant]: its dominant one is the gap
    return dominant + _power_iteration(loss, parameters, iterations, tolerance, seed,
                                       shift=dominant)


def _power_iteration(loss: Loss, parameters: Sequence[Tensor], iterations: int,
                     tolerance: float, seed: int, shift: float) -> float:
    """The eigenvalue of largest magnitude of H - shift I."""
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in parameters]
    norm = torch.sqrt(sum((v * v).sum() for v in vector))
    vector = [v / norm for v in vector]
    value = math.nan  # no value to compare the first with: at least two iterations
    for _ in range(iterations):
        gradients = torch.autograd.grad(loss(), parameters, create_graph=True)
        product = torch.autograd.grad(gradients, parameters, grad_outputs=vector)
        product = [h.detach() - shift * v for h, v in zip(product, vector)]
        new_value = float(sum((h * v).sum() for h, v in zip(product, vector)))
        norm = torch.sqrt(sum((h * h).sum() for h in product))
        if float(norm) == 0.0:
            return 0.0
        vector = [h / norm for h in product]
        if abs(new_value - value) <= tolerance * max(1.0, abs(new_value)):
            return new_value
        value = new_value
    log.warning("power iteration on the Hessian did not converge to a relative %g in %d "
                "iterations: %.6g is an estimate", tolerance, iterations, value)
    return value


@torch.no_grad()
def _set(parameters: Sequence[Tensor], originals: Sequence[Tensor],
         deltas: Sequence[Tensor] | None = None) -> None:
    """parameters = originals (+ deltas), exactly (adding and subtracting would round)."""
    for i, (p, o) in enumerate(zip(parameters, originals)):
        p.copy_(o if deltas is None else o + deltas[i])


def worst_case_increase(loss: Loss, parameters: Sequence[Tensor], rho: float,
                        steps: int = 10) -> dict[str, float]:
    """The largest loss found in the box |delta_i| <= rho (|w_i| + 1), and the first-order
    term of its increase; the parameters are left as they were."""
    if steps < 1:
        raise ValueError(f"worst_case_increase needs at least one ascent step, got {steps}")
    originals = [p.detach().clone() for p in parameters]
    bounds = [rho * (o.abs() + 1) for o in originals]
    deltas = [torch.zeros_like(o) for o in originals]
    base = worst = first_order = 0.0
    try:
        for step in range(steps):
            _set(parameters, originals, deltas)
            value = loss()
            gradients = torch.autograd.grad(value, parameters)
            if step == 0:
                base = worst = float(value.detach())
                if not math.isfinite(base):  # every measure below would be nan or inf
                    raise TrainingDiverged(f"the training loss at these weights is {base}: "
                                           "their sharpness is undefined")
                first_order = float(sum((b * g.abs()).sum() for b, g in zip(bounds, gradients)))
            worst = max(worst, float(value.detach()))
            size = 2.0 / (step + 2)  # the whole half-width first, then finer steps
            deltas = [torch.maximum(torch.minimum(d + size * b * _up_sign(g), b), -b)
                      for d, b, g in zip(deltas, bounds, gradients)]
        _set(parameters, originals, deltas)
        with torch.no_grad():
            worst = max(worst, float(loss()))
    finally:
        _set(parameters, originals)
    return {"loss": base, "worst_loss": worst, "increase": worst - base,
            "keskar_sharpness": 100.0 * (worst - base) / (1.0 + base),
            "first_order": first_order, "second_order": worst - base - first_order}


def _up_sign(gradient: Tensor) -> Tensor:
    """sign(g) with sign(0) = +1: at an exact stationary point the ascent still moves."""
    return torch.where(gradient >= 0, 1.0, -1.0).to(gradient.dtype)


def measured_parameters(model: nn.Module) -> list[Tensor]:
    """Every trainable parameter but those of the auxiliary BatchNorms."""
    return [p for name, p in model.named_parameters() if p.requires_grad and ".aux." not in name]


def model_sharpness(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], rho: float = 5e-4,
                    iterations: int = 50, steps: int = 10) -> dict[str, float]:
    """Both measures of `model`'s mean cross-entropy over `batches` (images in [0, 1], labels),
    in eval mode (running BatchNorm statistics, no dropout)."""
    was_training = model.training
    model.eval()
    count = sum(len(y) for _, y in batches)

    def loss() -> Tensor:
        return sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in batches) / count

    parameters = measured_parameters(model)
    try:  # attention's fused kernels (timm's ViTs) have no second derivative; the math one has
        with sdpa_kernel([SDPBackend.MATH]):
            result = worst_case_increase(loss, parameters, rho, steps)
            result["hessian_top_eigenvalue"] = top_eigenvalue(loss, parameters, iterations)
    finally:
        model.train(was_training)
    return {**result, "images": count, "rho": rho}
