"""Optimizer factory: names in the config map to builders; new optimizers register here."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from conadv.config import OptimConfig, shown
from conadv.errors import ConfigError
from conadv.optim.lamb import LAMB
from conadv.optim.lars import LARS
from conadv.optim.param_groups import split_decay_groups

Builder = Callable[[list[dict], OptimConfig, float], torch.optim.Optimizer]
# optim.name's names
OPTIMIZERS: dict[str, Builder] = {}


def register_optimizer(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        OPTIMIZERS[name] = builder
        return builder

    return add


@register_optimizer("sgd")
def _sgd(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    for group in groups:
        group.pop("adapt", None)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           foreach=True)


@register_optimizer("lars")
def _lars(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return LARS(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                trust_coeff=cfg.trust_coefficient, eps=cfg.eps, trust_clip=cfg.trust_clip)


@register_optimizer("lamb")
def _lamb(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.backend == "apex":
        return _apex_fused_lamb(groups, cfg, lr)
    return LAMB(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                grad_averaging=cfg.grad_averaging, max_grad_norm=cfg.max_grad_norm or None,
                decoupled_decay=cfg.decoupled_decay, trust_clip=cfg.trust_clip)


def _apex_fused_lamb(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """NVIDIA apex's FusedLAMB, when apex is built on this CUDA machine (it is not on PyPI)."""
    try:
        from apex.optimizers import FusedLAMB
    except ImportError:
        raise ConfigError("optim.backend=apex needs NVIDIA apex, which is not installed here "
                          "(build it from source on a CUDA machine; it is not on PyPI), or use "
                          "optim.backend=native") from None
    if not torch.cuda.is_available():
        raise ConfigError("optim.backend=apex runs on CUDA only; use optim.backend=native")
    for group in groups:
        group.pop("adapt", None)
    return FusedLAMB(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                     adam_w_mode=cfg.decoupled_decay, grad_averaging=cfg.grad_averaging,
                     max_grad_norm=cfg.max_grad_norm, use_nvlamb=cfg.always_adapt)


def check_optimizer(cfg: OptimConfig) -> None:
    """One sentence unless optim.name is a registered optimizer its backend provides."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"config key 'optim.name' must be one of {', '.join(OPTIMIZERS)}; got "
                          f"{shown(cfg.name)}")
    if cfg.backend == "apex" and cfg.name != "lamb":
        raise ConfigError("optim.backend=apex provides only FusedLAMB; set optim.name=lamb or "
                          "optim.backend=native")


def build_optimizer(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], cfg: OptimConfig,
                    lr: float) -> torch.optim.Optimizer:
    """The optimizer of the config over default groups (MLPerf skip list for BN/bias)."""
    groups = split_decay_groups(named_parameters, cfg.weight_decay, cfg.decay_bn_bias)
    if cfg.always_adapt:
        for group in groups:
            group["adapt"] = True
    check_optimizer(cfg)
    return OPTIMIZERS[cfg.name](groups, cfg, lr)
