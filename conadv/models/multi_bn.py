"""Auxiliary BatchNorm: one set of statistics and affine parameters per view type.

ConAdv (following AdvProp) normalises clean images with the main BatchNorm and adversarial
images with an auxiliary one, since their statistics differ; the released code also gives the
augmented view its own. `MultiBatchNorm2d` *is* the main `BatchNorm2d` (its own weight, bias and
running statistics keep torchvision's names, so exported weights are plain torchvision) and holds
the auxiliary sets under `aux.<route>`.

A forward pass is routed by a plan set on the model with `bn_views`: a list of (route, rows)
that splits the batch along dim 0, so all views go through the network in one concatenated
forward (one DDP forward, large convolutions) while each slice uses its own statistics. With
`update_stats=False` (used by attacks) BatchNorm uses batch statistics but leaves every running
statistic and counter untouched. Without a plan (evaluation, export) the main BN is used.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAIN = "main"


class MultiBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, aux_routes: Sequence[str] = (), **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.aux = nn.ModuleDict({route: nn.BatchNorm2d(num_features, **kwargs)
                                  for route in aux_routes})
        self.plan: list[tuple[str, int]] | None = None
        self.update_stats = True

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, aux_routes: Sequence[str]) -> MultiBatchNorm2d:
        device = next(iter(bn.state_dict().values())).device
        multi = cls(bn.num_features, (), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, device=device)
        multi.load_state_dict(bn.state_dict())
        multi.aux = nn.ModuleDict({route: copy.deepcopy(bn) for route in aux_routes})
        if _is_norm_act(bn):  # timm's BatchNormAct2d: normalise, then its dropout and activation
            multi.drop, multi.act = bn.drop, bn.act
        return multi

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A state without this layer's auxiliary sets (a vanilla checkpoint resumed with
        ConAdv on) starts them as copies of the main set it loads, as a fresh conversion
        does, not as the untrained initial values. The auxiliary sets load after this call,
        from the same (copied) state_dict."""
        for route in self.aux:
            for name in self.aux[route].state_dict():
                key, main = f"{prefix}aux.{route}.{name}", f"{prefix}{name}"
                if key not in state_dict and main in state_dict:
                    state_dict[key] = state_dict[main]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _stats_owner(self, route: str) -> nn.BatchNorm2d:
        return self if route == MAIN else self.aux[route]

    def _normalize(self, x: Tensor, owner: nn.BatchNorm2d) -> Tensor:
        update = self.training and self.update_stats and owner.track_running_stats
        factor = 0.0 if owner.momentum is None else owner.momentum
        if update:
            owner.num_batches_tracked.add_(1)
            if owner.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(owner.num_batches_tracked)
        use_batch_stats = self.training or not owner.track_running_stats
        keep_stats = update or not self.training
        return F.batch_norm(x, owner.running_mean if keep_stats else None,
                            owner.running_var if keep_stats else None, owner.weight, owner.bias,
                            use_batch_stats, factor, owner.eps)

    def forward(self, x: Tensor) -> Tensor:
        plan = self.plan
        if not plan or not self.training:
            out = self._normalize(x, self)
        elif len(plan) == 1:
            out = self._normalize(x, self._stats_owner(plan[0][0]))
        else:
            parts = torch.split(x, [rows for _, rows in plan])
            out = torch.cat([self._normalize(part, self._stats_owner(route))
                             for part, (route, _) in zip(parts, plan)])
        if hasattr(self, "act"):
            out = self.act(self.drop(out))
        return out


def _is_norm_act(module: nn.Module) -> bool:
    """timm's BatchNormAct2d: a BatchNorm2d whose forward then applies `drop` and `act`."""
    return (isinstance(module, nn.BatchNorm2d) and isinstance(getattr(module, "act", None),
                                                              nn.Module)
            and isinstance(getattr(module, "drop", None), nn.Module))


def _convertible(module: nn.Module) -> bool:
    """A BatchNorm2d whose forward is plain batch normalisation (or timm's norm + act)."""
    return type(module) is nn.BatchNorm2d or (
        _is_norm_act(module) and type(module).__name__ == "BatchNormAct2d")


def routable(module: nn.Module) -> bool:
    """A layer whose statistics conadv routes per view (or will, once converted)."""
    return isinstance(module, MultiBatchNorm2d) or _convertible(module)


def other_normalisation(model: nn.Module) -> list[str]:
    """The model's normalisation layers that cannot be routed per view (LayerNorm, GroupNorm,
    BatchNorm variants with their own forward...): each type once, with a layer's name."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
             nn.LocalResponseNorm)
    seen: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, norms) and not routable(module):
            seen.setdefault(type(module).__name__, name)
    return [f"{kind} ({name})" for kind, name in seen.items()]


def convert_to_multi_bn(model: nn.Module, aux_routes: Sequence[str]) -> nn.Module:
    """Replace every BatchNorm2d in place by a MultiBatchNorm2d whose auxiliary sets start as
    copies of the main one. Call before building the optimizer and wrapping in DDP. A
    BatchNorm2d subclass is converted only if its forward is known (timm's BatchNormAct2d);
    other normalisation stays as it is (see `other_normalisation`)."""
    for name, child in model.named_children():
        if _convertible(child):
            setattr(model, name, MultiBatchNorm2d.from_batchnorm(child, aux_routes))
        elif not isinstance(child, MultiBatchNorm2d):
            convert_to_multi_bn(child, aux_routes)
    return model


def multi_bn_layers(model: nn.Module) -> list[MultiBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, MultiBatchNorm2d)]


@contextmanager
def bn_views(model: nn.Module, plan: Sequence[tuple[str, int]],
             update_stats: bool = True) -> Iterator[None]:
    """Route the rows of the next forward passes: plan = [(route, rows), ...] in batch order.
    Adjacent slices with the same route are normalised together."""
    merged: list[tuple[str, int]] = []
    for route, rows in plan:
        if merged and merged[-1][0] == route:
            merged[-1] = (route, merged[-1][1] + rows)
        else:
            merged.append((route, rows))
    layers = multi_bn_layers(model)
    saved = [(layer.plan, layer.update_stats) for layer in layers]
    for layer in layers:
        layer.plan, layer.update_stats = merged, update_stats
    try:
        yield
    finally:
        for layer, (old_plan, old_update) in zip(layers, saved):
            layer.plan, layer.update_stats = old_plan, old_update


def main_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the auxiliary BatchNorm entries: what remains is the plain model's state_dict."""
    return {k: v for k, v in state.items() if ".aux." not in k}
