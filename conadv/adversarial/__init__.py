"""Adversarial examples and the ConAdv engine: the only package that knows ConAdv. Knows
nothing about DDP or data loaders: it is handed a module, batches and a small context (and,
for attack ranks, the process groups its link speaks over)."""

from conadv.adversarial.attacks import AttackSpec, draw_per_sample, perturb
from conadv.adversarial.engine import (
    EngineContext,
    LookaheadEngine,
    TrainInputs,
    ViewEngine,
    build_engine,
)

__all__ = [
    "AttackSpec",
    "LookaheadEngine",
    "EngineContext",
    "TrainInputs",
    "draw_per_sample",
    "ViewEngine",
    "build_engine",
    "perturb",
]
