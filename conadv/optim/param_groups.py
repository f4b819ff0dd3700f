"""Parameter groups: the MLPerf skip list (BatchNorm and bias parameters, i.e. ndim <= 1) gets
no weight decay and, for layer-wise optimizers, no trust ratio."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def split_decay_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                       weight_decay: float, decay_bn_bias: bool = False) -> list[dict]:
    """Two groups: {'params': weights, 'weight_decay': wd, 'adapt': True} and
    {'params': bn/bias, 'weight_decay': 0, 'adapt': False} (unless decay_bn_bias)."""
    decay, skip = [], []
    for _, param in named_params:
        if not param.requires_grad:
            continue
        (skip if param.ndim <= 1 and not decay_bn_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "adapt": True}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0, "adapt": False})
    return groups
