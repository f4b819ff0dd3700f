"""FGSM and k-step PGD under an L-inf bound, in [0, 1] pixel space (the model normalises).

The published ConAdv default is one step, eps = step = 9/255, targeted toward a random wrong
label (the loss to that label is minimised), starting from uniform noise in [-eps, eps] with
probability 0.8 and from the clean image otherwise. Untargeted mode maximises the loss of the
true label. The input gradient comes from torch.autograd.grad with respect to the input only,
so no parameter's .grad is written and no DDP hook fires; it is fp32 even under autocast
(the input leaf is fp32). The loss is the *sum* of the per-image cross-entropies: only the
gradient's sign is used, and a mean would divide every image's gradient by the batch size,
which under fp16 autocast pushes small entries below fp16's range to 0 (sign 0: pixel left
unattacked). Random draws come from the generator the caller passes, so an attack is a pure
function of (weights, images, labels, seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from conadv.randomness import evaluation_attack_seed


@dataclass(frozen=True)
class AttackSpec:
    epsilon: float = 9 / 255
    step_size: float = 9 / 255
    steps: int = 1
    random_start_prob: float = 0.8
    targeted: bool = True


@dataclass(frozen=True)
class AttackDraws:
    """The random numbers of one attack: wrong-label offsets, start noise, start coin flips."""

    offsets: Tensor  # [B] in [1, num_classes)
    noise: Tensor  # [B, C, H, W] in [0, 1)
    starts: Tensor  # [B, 1, 1, 1] in [0, 1)


def draw(shape: torch.Size, num_classes: int, generator: torch.Generator | None,
         device: torch.device) -> AttackDraws:
    """Every draw happens whatever the options, so the stream does not depend on them."""
    return AttackDraws(
        torch.randint(1, num_classes, shape[:1], generator=generator, device=device),
        torch.rand(shape, generator=generator, device=device),
        torch.rand((shape[0], 1, 1, 1), generator=generator, device=device))


def draw_per_sample(shape: torch.Size, num_classes: int, indices: Tensor, seed: int,
                    attack: int, device: torch.device) -> AttackDraws:
    """Draws seeded by each sample's dataset index: the same image gets the same random start
    however the data is sharded (used by evaluation, where results must not depend on the
    world size)."""
    per_sample = [draw(torch.Size((1, *shape[1:])), num_classes,
                       torch.Generator().manual_seed(evaluation_attack_seed(seed, attack,
                                                                            int(i))),
                       torch.device("cpu")) for i in indices.tolist()]
    return AttackDraws(*(torch.cat([getattr(d, f) for d in per_sample]).to(device)
                         for f in ("offsets", "noise", "starts")))


def input_gradient(model: Callable[[Tensor], Tensor], images: Tensor, goal: Tensor,
                   autocast: Callable | None = None) -> Tensor:
    """d(sum of cross-entropies to `goal`)/d(images), fp32, with no parameter .grad written."""
    leaf = images.detach().requires_grad_(True)
    if autocast is None:
        logits = model(leaf)
    else:
        with autocast():
            logits = model(leaf)
    loss = F.cross_entropy(logits.float(), goal, reduction="sum")
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def perturb(model: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor,
            spec: AttackSpec, num_classes: int, generator: torch.Generator | None = None,
            autocast: Callable | None = None, draws: AttackDraws | None = None) -> Tensor:
    """Adversarial images (detached fp32, within eps of `images` and inside [0, 1]). Random
    numbers come from `draws` when given, else from `generator`."""
    x = images.detach().float()
    if draws is None:
        draws = draw(x.shape, num_classes, generator, x.device)
    offsets, noise, starts = draws.offsets, draws.noise, draws.starts
    goal = (labels + offsets) % num_classes if spec.targeted else labels
    start = (noise * 2 - 1) * spec.epsilon * (starts < spec.random_start_prob)
    adv = (x + start).clamp_(0, 1)
    for _ in range(spec.steps):
        grad = input_gradient(model, adv, goal, autocast)
        step = grad.sign_().mul_(-spec.step_size if spec.targeted else spec.step_size)
        adv = adv.detach().add_(step)
        adv = torch.minimum(torch.maximum(adv, x - spec.epsilon), x + spec.epsilon).clamp_(0, 1)
    return adv.detach()
