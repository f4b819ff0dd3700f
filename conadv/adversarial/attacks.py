"""FGSM and k-step PGD under an L-inf bound, in [0, 1] pixel space (the model normalises).

The published ConAdv default is one step, eps = step = 9/255, targeted toward a random wrong
label (the loss to that label is minimised), starting from uniform noise in [-eps, eps] with
probability 0.8 and from the clean image otherwise. Untargeted mode maximises the loss of the
true label. The input gradient comes from torch.autograd.grad with respect to the input only,
so no parameter's .grad is written and no DDP hook fires; it is fp32 even under autocast
(the input leaf is fp32). Random draws come from the generator the caller passes, so an attack
is a pure function of (weights, images, labels, seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AttackSpec:
    epsilon: float = 9 / 255
    step_size: float = 9 / 255
    steps: int = 1
    random_start_prob: float = 0.8
    targeted: bool = True


def perturb(model: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor,
            spec: AttackSpec, num_classes: int, generator: torch.Generator | None = None,
            autocast: Callable | None = None) -> Tensor:
    """Adversarial images (detached fp32, within eps of `images` and inside [0, 1])."""
    x = images.detach().float()
    batch = x.shape[0]
    # Every draw happens whatever the options, so the random stream does not depend on them.
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator,
                            device=labels.device)
    noise = torch.rand(x.shape, generator=generator, device=x.device)
    starts = torch.rand((batch, 1, 1, 1), generator=generator, device=x.device)
    goal = (labels + offsets) % num_classes if spec.targeted else labels
    start = (noise * 2 - 1) * spec.epsilon * (starts < spec.random_start_prob)
    adv = (x + start).clamp_(0, 1)
    for _ in range(spec.steps):
        adv.requires_grad_(True)
        if autocast is None:
            logits = model(adv)
        else:
            with autocast():
                logits = model(adv)
        loss = F.cross_entropy(logits.float(), goal)
        (grad,) = torch.autograd.grad(loss, adv)
        step = grad.sign_().mul_(-spec.step_size if spec.targeted else spec.step_size)
        adv = adv.detach().add_(step)
        adv = torch.minimum(torch.maximum(adv, x - spec.epsilon), x + spec.epsilon).clamp_(0, 1)
    return adv.detach()
