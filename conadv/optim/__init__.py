"""Large-batch optimizers (LARS, LAMB), parameter groups and learning-rate schedules; usable on
their own, without the rest of conadv (they are handed parameter groups, never a model)."""

from conadv.optim.factory import (
    OPTIMIZERS,
    build_optimizer,
    check_optimizer,
    register_optimizer,
)
from conadv.optim.lamb import LAMB
from conadv.optim.lars import LARS
from conadv.optim.param_groups import split_decay_groups
from conadv.optim.schedules import WarmupDecay, build_scheduler, scaled_lr

__all__ = [
    "OPTIMIZERS",
    "LAMB",
    "LARS",
    "WarmupDecay",
    "build_optimizer",
    "build_scheduler",
    "check_optimizer",
    "register_optimizer",
    "scaled_lr",
    "split_decay_groups",
]
