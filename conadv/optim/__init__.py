"""Optimizers, parameter groups and learning-rate schedules; usable without the rest of conadv."""

from conadv.optim.factory import build_optimizer, register_optimizer
from conadv.optim.param_groups import split_decay_groups
from conadv.optim.schedules import WarmupDecay, build_scheduler, scaled_lr

__all__ = [
    "WarmupDecay",
    "build_optimizer",
    "build_scheduler",
    "register_optimizer",
    "scaled_lr",
    "split_decay_groups",
]
