"""Adversarial examples and the ConAdv engine. Knows nothing about DDP or data loaders: it is
handed a module, batches and a stream executor."""

from conadv.adversarial.attacks import AttackSpec, perturb
from conadv.adversarial.engine import ConAdvEngine, TrainInputs, ViewEngine, build_engine
from conadv.adversarial.streams import CudaStreamExecutor, SequentialExecutor, build_executor

__all__ = [
    "AttackSpec",
    "ConAdvEngine",
    "CudaStreamExecutor",
    "SequentialExecutor",
    "TrainInputs",
    "ViewEngine",
    "build_engine",
    "build_executor",
    "perturb",
]
