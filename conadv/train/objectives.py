"""What the student minimises: one component per training mode, so the training step calls the
same four things whatever the mode, and nothing of a mode's machinery shows in trainer.py.

- `CrossEntropy` (vanilla and ConAdv): each view's cross-entropy to its (possibly mixed)
  labels, label smoothing as configured.
- `Trades` (ConAdv with `adv.trades_beta` > 0): the same, plus a TRADES-style term across views
  (Zhang et al., ICML 2019): beta x KL(clean prediction || adversarial prediction), which
  pulls each adversarial image's prediction toward its clean image's.
- `Distillation` (MEAL V2): each view's soft cross-entropy to the teachers' mean (and the
  optional hard-label term), plus, optionally, an output discriminator with its own optimizer
  that learns after every micro-batch and steps with the student (conadv/distill/).

An objective is called on a micro-batch's logits and inputs and returns the loss and the
statistics logged with it (by default `weighted_views`: the weighted mean of its per-view loss
over the views, so a term across views is written here and nowhere else), learns from each
micro-batch after its backward (`learn`), steps its own parameters with the student's optimizer
step (`step`, undone with it by the non-finite guard: `optimizers`), and names the parts a
checkpoint holds (`checkpointed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conadv.config import RunConfig
from conadv.distill import DiscriminatorTrainer, DistillationLoss


class Objective(Protocol):
    optimizers: list[torch.optim.Optimizer]  # its own, stepped by `step`

    def __call__(self, logits: Tensor, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]: ...

    def view_loss(self, logits: Tensor, targets: Tensor, soft: Tensor | None) -> Tensor: ...

    def learn(self, logits: Tensor, inputs: Any, accumulation: int) -> dict[str, Tensor]: ...

    def step(self) -> None: ...

    def checkpointed(self) -> dict[str, Any]: ...


def weighted_views(view_loss: Callable[[Tensor, Tensor, Tensor | None], Tensor],
                   logits: Tensor, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted mean over the views of `view_loss(logits, targets, soft_targets)` of each;
    each view's loss and the adversarial success rate (misclassified adversarial images) as
    detached device tensors."""
    logits = logits.float()
    soft = inputs.soft_targets
    if len(inputs.views) == 1:  # one view: its loss is the loss (no device operation)
        part = view_loss(logits, inputs.targets, soft)
        return part, {f"{inputs.views[0][0]}_loss": part.detach()}
    total = logits.new_zeros(())
    weight_sum = 0.0
    stats: dict[str, Tensor] = {}
    rows_of = view_rows(inputs.views)
    for view, _, weight in inputs.views:
        rows = rows_of[view]
        part = view_loss(logits[rows], inputs.targets[rows],
                         soft[rows] if soft is not None else None)
        stats[f"{view}_loss"] = part.detach()
        if view == "adv":
            wrong = logits[rows].argmax(dim=1) != inputs.labels
            stats["adv_success"] = wrong.float().mean()
        total = total + weight * part
        weight_sum += weight
    return total / weight_sum, stats


def view_rows(views: list[tuple[str, int, float]]) -> dict[str, slice]:
    """Each view's rows of the micro-batch (the views are concatenated in order)."""
    rows, start = {}, 0
    for view, count, _ in views:
        rows[view] = slice(start, start + count)
        start += count
    return rows


class CrossEntropy:
    """Training on labels: vanilla, and ConAdv's clean, augmented and adversarial views."""

    def __init__(self, label_smoothing: float) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.optimizers: list[torch.optim.Optimizer] = []

    def __call__(self, logits: Tensor, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return weighted_views(self.view_loss, logits, inputs)

    def view_loss(self, logits: Tensor, targets: Tensor, soft: Tensor | None) -> Tensor:
        return self.criterion(logits, targets)

    def learn(self, logits: Tensor, inputs: Any, accumulation: int) -> dict[str, Tensor]:
        return {}

    def step(self) -> None:
        pass

    def checkpointed(self) -> dict[str, Any]:
        return {}


class Trades(CrossEntropy):
    """The views' cross-entropy and beta x KL(clean || adversarial) over the rows of each image,
    in nats per image: TRADES' regulariser (Zhang et al., "Theoretically Principled Trade-off
    between Robustness and Accuracy", ICML 2019), here on ConAdv's adversarial view."""

    def __init__(self, label_smoothing: float, beta: float) -> None:
        super().__init__(label_smoothing)
        self.beta = beta

    def __call__(self, logits: Tensor, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logits = logits.float()  # once, for both terms (weighted_views' own is then a no-op)
        loss, stats = weighted_views(self.view_loss, logits, inputs)
        rows = view_rows(inputs.views)
        clean = F.log_softmax(logits[rows["clean"]], dim=1)
        adv = F.log_softmax(logits[rows["adv"]], dim=1)
        kl = F.kl_div(adv, clean, reduction="batchmean", log_target=True)
        stats["trades_kl"] = kl.detach()
        return loss + self.beta * kl, stats


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

    def __call__(self, logits: Tensor, inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return weighted_views(self.view_loss, logits, inputs)

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
    if cfg.adv.trades_beta:
        return Trades(cfg.train.label_smoothing, cfg.adv.trades_beta)
    return CrossEntropy(cfg.train.label_smoothing)
