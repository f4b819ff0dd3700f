"""What the student minimises: one component per training mode, so the training step calls the
same four things whatever the mode, and nothing of a mode's machinery shows in trainer.py.

- `CrossEntropy` (vanilla and ConAdv): each view's cross-entropy to its (possibly mixed)
  labels, label smoothing as configured.
- `Distillation` (MEAL V2): each view's soft cross-entropy to the teachers' mean (and the
  optional hard-label term), plus, optionally, an output discriminator with its own optimizer
  that learns after every micro-batch and steps with the student (conadv/distill/).

An objective is called per view (`view_loss`, handed to the engine, which weighs the views),
learns from each micro-batch after its backward (`learn`), steps its own parameters with the
student's optimizer step (`step`, undone with it by the non-finite guard: `optimizers`), and
names the parts a checkpoint holds (`checkpointed`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from conadv.config import RunConfig
from conadv.distill import DiscriminatorTrainer, DistillationLoss


class Objective(Protocol):
    optimizers: list[torch.optim.Optimizer]  # its own, stepped by `step`

    def view_loss(self, logits: Tensor, targets: Tensor, soft: Tensor | None) -> Tensor: ...

    def learn(self, logits: Tensor, inputs: Any, accumulation: int) -> dict[str, Tensor]: ...

    def step(self) -> None: ...

    def checkpointed(self) -> dict[str, Any]: ...


class CrossEntropy:
    """Training on labels: vanilla, and ConAdv's clean, augmented and adversarial views."""

    def __init__(self, label_smoothing: float) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.optimizers: list[torch.optim.Optimizer] = []

    def view_loss(self, logits: Tensor, targets: Tensor, soft: Tensor | None) -> Tensor:
        return self.criterion(logits, targets)

    def learn(self, logits: Tensor, inputs: Any, accumulation: int) -> dict[str, Tensor]:
        return {}

    def step(self) -> None:
        pass

    def checkpointed(self) -> dict[str, Any]:
        return {}


class Distillation:
    """MEAL V2: the teachers' soft targets, and optionally the output discriminator."""

    def __init__(self, cfg: RunConfig, num_classes: int, device: torch.device) -> None:
        d = cfg.distill
        self.discriminator = (DiscriminatorTrainer(num_classes, d.discriminator_lr,
                                                   d.temperature, device, cfg.train.seed)
                              if d.discriminator else None)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.loss = DistillationLoss(d, criterion, self.discriminator)
        self.optimizers = [self.discriminator.optimizer] if self.discriminator else []

    def view_loss(self, logits: Tensor, targets: Tensor, soft: Tensor | None) -> Tensor:
        return self.loss(logits, targets, soft)

    def learn(self, logits: Tensor, inputs: Any, accumulation: int) -> dict[str, Tensor]:
        """The discriminator learns teacher vs (detached) student on this micro-batch."""
        if self.discriminator is None:
            return {}
        return self.discriminator.learn(logits, inputs.soft_targets, accumulation)

    def step(self) -> None:
        if self.discriminator is not None:
            self.discriminator.step()

    def checkpointed(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator} if self.discriminator else {}


def build_objective(cfg: RunConfig, num_classes: int, device: torch.device) -> Objective:
    if cfg.distill.enabled:
        return Distillation(cfg, num_classes, device)
    return CrossEntropy(cfg.train.label_smoothing)
