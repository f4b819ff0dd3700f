"""Per-step learning rate: linear warm-up, then cosine, polynomial or step decay; LR scaling
rules.

The schedule is a multiplier for torch's LambdaLR, so it works with any optimizer and its
position is saved like any torch scheduler. Conventions (MLPerf's): the LR of optimizer step s
(0-based) during warm-up is start + (peak - start) * s / W, so step 0 uses `start`; after
warm-up, progress p = (s - W) / (T - 1 - W) runs from 0 at step W to 1 at the last step T - 1,
which therefore uses `end_lr`. Step decay multiplies the peak LR by `step_factor` at each
boundary step (the first step of the epoch named in `step_epochs`), as MEAL V2's recipe does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from conadv.config import ScheduleConfig


def scaled_lr(lr: float, rule: str, global_batch: int, base_batch: int) -> float:
    """Peak LR for `global_batch` from the LR at `base_batch`: linear (Goyal et al., for SGD
    and LARS) or square root (for LAMB/Adam-type optimizers)."""
    ratio = global_batch / base_batch
    return {"none": lr, "linear": lr * ratio, "sqrt": lr * math.sqrt(ratio)}[rule]


@dataclass(frozen=True)
class WarmupDecay:
    """lr(step) for `total_steps` optimizer steps."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    warmup_start_lr: float = 0.0
    decay: str = "cosine"
    poly_power: float = 2.0
    end_lr: float = 0.0
    step_boundaries: tuple[int, ...] = ()  # decay=step: steps where the LR drops
    step_factor: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * (
                step / self.warmup_steps)
        if self.decay == "constant":
            return self.peak_lr
        if self.decay == "step":
            drops = sum(1 for boundary in self.step_boundaries if step >= boundary)
            return self.peak_lr * self.step_factor ** drops
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = (1.0 - progress) ** self.poly_power
        return self.end_lr + (self.peak_lr - self.end_lr) * shape


class _Multiplier:
    """LambdaLR multiplies each group's initial lr; groups start at the peak lr."""

    def __init__(self, schedule: WarmupDecay) -> None:
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        return self.schedule(step) / self.schedule.peak_lr if self.schedule.peak_lr else 0.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, peak_lr: float,
                    steps_per_epoch: float, total_steps: int,
                    start_step: int = 0) -> tuple[LambdaLR, WarmupDecay]:
    """The scheduler positioned at `start_step` (a resumed run): its state is a function of
    the config and the step, so checkpoints store the step, never a pickled schedule."""
    warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    boundaries = tuple(round(epoch * steps_per_epoch) for epoch in cfg.step_epochs)
    schedule = WarmupDecay(peak_lr, total_steps, warmup, cfg.warmup_start_lr, cfg.decay,
                           cfg.poly_power, cfg.end_lr, boundaries, cfg.step_factor)
    for group in optimizer.param_groups:
        group["lr"] = peak_lr
        group["initial_lr"] = peak_lr
    return LambdaLR(optimizer, _Multiplier(schedule), last_epoch=start_step - 1), schedule
