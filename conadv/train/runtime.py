"""Run-time set-up shared by training and evaluation: seeding, determinism, compilation and
autocast."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial

import numpy as np
import torch
from torch import nn

from conadv.config import CUDA_GRAPH_MODES
from conadv.errors import ConfigError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def compiler(enabled: bool, mode: str, device: torch.device
             ) -> Callable[[nn.Module], nn.Module] | None:
    """What compiles the training forward (train.compile, train.compile_mode), or None for
    eager. A mode that captures CUDA graphs is refused off CUDA."""
    if not enabled:
        return None
    if mode in CUDA_GRAPH_MODES and device.type != "cuda":
        raise ConfigError(f"train.compile_mode={mode} captures CUDA graphs, which need a CUDA "
                          f"device (this run is on {device.type}); use default or "
                          "max-autotune-no-cudagraphs")
    # the default mode is not named: a test may swap in another backend, which takes no mode
    return torch.compile if mode == "default" else partial(torch.compile, mode=mode)


def attack_compiler(enabled: bool, mode: str, device: torch.device
                    ) -> Callable[[nn.Module], nn.Module] | None:
    """What compiles the attack's forward: the training's mode without CUDA graphs. Graphs
    replay from one memory pool in the order they were captured; the attack's would replay on
    its side stream beside the training's, which that pool does not allow for."""
    if mode in CUDA_GRAPH_MODES:
        mode = "default" if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
    return compiler(enabled, mode, device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32 (no autocast)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        # accepted (the GradScaler path is the same as on a GPU) but said: measured 9.8x
        # slower than fp32 on the demo, since most CPUs have no float16 arithmetic
        log.warning("train.precision=fp16 on the CPU is emulated and about ten times slower "
                    "than fp32; bf16 is the CPU's half precision")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_factory(device: torch.device,
                     dtype: torch.dtype | None) -> Callable[[], AbstractContextManager]:
    """A no-argument factory of autocast contexts (a nullcontext for fp32). A plain function,
    not a bound method, so whoever holds it keeps no reference to its creator."""
    if dtype is None:
        return nullcontext
    return partial(torch.autocast, device.type, dtype=dtype)
