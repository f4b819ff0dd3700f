"""LARS (You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", 2017, arXiv
1708.03888) with the MLPerf ResNet-50 reference semantics (its lars_util: skip list
['batch_normalization', 'bias'], trust ratio eeta ||w|| / (||g|| + wd ||w|| + eps)).

For every tensor w of a group that adapts:
    r = eeta ||w|| / (||g|| + wd ||w|| + eps)      (1 when ||w|| or ||g|| is 0)
    r = min(r / lr, 1)                                (only with trust_clip: LARC clipping)
    d = r (g + wd w)
    v <- momentum v + d          (v = d on the first step)
    w <- w - lr v                (Nesterov: w <- w - lr (d + momentum v))
Groups that do not adapt take d = g + wd w. conadv's parameter groups give BatchNorm and bias
parameters weight_decay=0 and adapt=False (MLPerf's skip list); `adapt=True` on every group is
the apex LARC / torchlars behaviour. By default a group adapts when its weight decay is not 0,
which is timm's rule.

Choice: the learning rate multiplies the momentum buffer (PyTorch SGD and timm convention). The
TF MLPerf reference puts lr inside the buffer (v <- m v + lr d; w <- w - v); the two agree while
the LR is constant and differ only in how quickly an LR change reaches the step.

Multi-tensor: foreach norms and updates, with the trust ratio folded into the momentum update
(one addcmul instead of a scale pass and an add pass); no host synchronisation in step().
"""

from __future__ import annotations

import torch
from torch import Tensor

from conadv.optim.multi_tensor import bucket_params, trust_ratios


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, trust_coeff: float = 0.001, eps: float = 1e-8,
                 trust_clip: bool = False, adapt: bool | None = None) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eps < 0:
            raise ValueError("lr, momentum, weight_decay and eps must be non-negative")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, adapt=adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for params in bucket_params(group["params"]):
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[Tensor]) -> None:
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        adapt = group["adapt"] if group["adapt"] is not None else wd != 0
        grads = [p.grad for p in params]
        # d = g + wd w, in new tensors: p.grad is left as it was
        direction = torch._foreach_add(grads, params, alpha=wd) if wd else grads
        scales: list[Tensor] | None = None
        if adapt:
            ratios = trust_ratios(torch._foreach_norm(params), torch._foreach_norm(grads),
                                  group["trust_coeff"], wd, group["eps"])
            if group["trust_clip"]:
                ratios = torch.clamp(ratios / lr, max=1.0)
            scales = list(ratios.unbind())

        if momentum == 0:
            step = torch._foreach_mul(direction, scales) if scales else direction
            torch._foreach_add_(params, step, alpha=-lr)
            return

        states = [self.state[p] for p in params]
        if all("momentum_buffer" in s for s in states) and not group["nesterov"]:
            bufs = [s["momentum_buffer"] for s in states]
            torch._foreach_mul_(bufs, momentum)
            if scales:
                torch._foreach_addcmul_(bufs, direction, scales)
            else:
                torch._foreach_add_(bufs, direction)
            torch._foreach_add_(params, bufs, alpha=-lr)
            return

        # first step (buffers start as d) or Nesterov: materialise the scaled direction
        if scales:
            direction = torch._foreach_mul(direction, scales)
        elif direction is grads:
            direction = [g.clone() for g in grads]
        bufs = []
        for state, d in zip(states, direction):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d.clone()
            else:
                state["momentum_buffer"].mul_(momentum).add_(d)
            bufs.append(state["momentum_buffer"])
        step = torch._foreach_add(direction, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, step, alpha=-lr)
