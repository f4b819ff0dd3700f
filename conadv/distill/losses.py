"""MEAL V2's per-view loss: soft cross-entropy to the teachers' mean, the optional hard-label
term and the discriminator's adversarial term."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from conadv.config import DistillConfig
from conadv.distill.discriminator import DiscriminatorTrainer


def soft_cross_entropy(logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """mean over rows of -sum_c p_c log softmax(z / T)_c, times T^2 (Hinton et al. 2015: keeps
    the gradient's scale when T changes). Equals KL(p || q) up to p's entropy, a constant."""
    log_probs = F.log_softmax(logits.float() / temperature, dim=1)
    return -(target_probs * log_probs).sum(dim=1).mean() * temperature ** 2


class DistillationLoss:
    """soft_weight x soft CE to the teachers' mean + hard_weight x CE to the labels (0 as
    published: then the labels do not reach the gradient) + discriminator_weight x the
    adversarial loss of a discriminator that tells teacher from student outputs."""

    def __init__(self, cfg: DistillConfig, criterion: nn.Module,
                 discriminator: DiscriminatorTrainer | None) -> None:
        self.cfg = cfg
        self.criterion = criterion
        self.discriminator = discriminator

    def __call__(self, logits: Tensor, targets: Tensor, soft: Tensor | None) -> Tensor:
        cfg = self.cfg
        loss = cfg.soft_weight * soft_cross_entropy(logits, soft, cfg.temperature)
        if cfg.hard_weight:
            loss = loss + cfg.hard_weight * self.criterion(logits, targets)
        if self.discriminator is not None:
            loss = loss + cfg.discriminator_weight * self.discriminator.fooling_loss(logits)
        return loss
