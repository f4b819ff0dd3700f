"""Optimizer factory: names in the config map to builders; new optimizers register here."""

from __future__ import annotations

from collections.abc import Callable

import torch

from conadv.config import OptimConfig
from conadv.optim.param_groups import split_decay_groups

Builder = Callable[[list[dict], OptimConfig, float], torch.optim.Optimizer]
_BUILDERS: dict[str, Builder] = {}


def register_optimizer(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        return builder

    return add


@register_optimizer("sgd")
def _sgd(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    for group in groups:
        group.pop("adapt", None)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           foreach=True)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = split_decay_groups(model.named_parameters(), cfg.weight_decay, cfg.decay_bn_bias)
    return _BUILDERS[cfg.name](groups, cfg, lr)
