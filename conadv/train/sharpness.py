"""How flat is the minimum a model found: two measures of its training loss, in eval mode, on a
fixed subset of training images, over every parameter but the auxiliary BatchNorms' (which
only training's adversarial and augmented views use).

- `top_eigenvalue`: the Hessian's eigenvalue of largest magnitude (at a minimum, the largest),
  by power iteration on Hessian-vector products (double backward; the Hessian is never built).
- `worst_case_increase`: the largest training loss within the box |delta_i| <= rho (|w_i| + 1)
  around the weights (Keskar et al., ICLR 2017, "On large-batch training...", eq. 3 with
  A = I), found by projected sign-gradient ascent from the box's centre (the first step is
  SAM's first-order worst case for this box); reported as the increase and as Keskar's
  100 (max - L) / (1 + L).

Both take `loss(parameters) -> scalar` and the list of parameters, so they can be checked on
problems whose answer is known.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Loss = Callable[[], Tensor]


def top_eigenvalue(loss: Loss, parameters: Sequence[Tensor], iterations: int = 50,
                   tolerance: float = 1e-4, seed: int = 0) -> float:
    """The Hessian eigenvalue of largest magnitude of `loss` at `parameters`."""
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in parameters]
    norm = torch.sqrt(sum((v * v).sum() for v in vector))
    vector = [v / norm for v in vector]
    value = 0.0
    for _ in range(iterations):
        gradients = torch.autograd.grad(loss(), parameters, create_graph=True)
        product = torch.autograd.grad(gradients, parameters, grad_outputs=vector)
        new_value = float(sum((h * v).sum() for h, v in zip(product, vector)))
        norm = torch.sqrt(sum((h * h).sum() for h in product))
        if float(norm) == 0.0:
            return 0.0
        vector = [h.detach() / norm for h in product]
        if abs(new_value - value) <= tolerance * max(1.0, abs(new_value)):
            return new_value
        value = new_value
    return value


@torch.no_grad()
def _set(parameters: Sequence[Tensor], originals: Sequence[Tensor],
         deltas: Sequence[Tensor] | None = None) -> None:
    """parameters = originals (+ deltas), exactly (adding and subtracting would round)."""
    for i, (p, o) in enumerate(zip(parameters, originals)):
        p.copy_(o if deltas is None else o + deltas[i])


def worst_case_increase(loss: Loss, parameters: Sequence[Tensor], rho: float,
                        steps: int = 10) -> dict[str, float]:
    """The largest loss found in the box |delta_i| <= rho (|w_i| + 1); the parameters are
    left as they were."""
    with torch.no_grad():
        base = float(loss())
    originals = [p.detach().clone() for p in parameters]
    bounds = [rho * (o.abs() + 1) for o in originals]
    deltas = [torch.zeros_like(o) for o in originals]
    worst = base
    try:
        for step in range(steps):
            _set(parameters, originals, deltas)
            value = loss()
            gradients = torch.autograd.grad(value, parameters)
            worst = max(worst, float(value.detach()))
            size = 2.0 / (step + 2)  # the whole half-width first, then finer steps
            deltas = [torch.maximum(torch.minimum(d + size * b * g.sign(), b), -b)
                      for d, b, g in zip(deltas, bounds, gradients)]
        _set(parameters, originals, deltas)
        with torch.no_grad():
            worst = max(worst, float(loss()))
    finally:
        _set(parameters, originals)
    return {"loss": base, "worst_loss": worst, "increase": worst - base,
            "keskar_sharpness": 100.0 * (worst - base) / (1.0 + base)}


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
