"""LAMB (You et al., 2019): Adam moments with a layer-wise trust ratio.

Semantics follow timm's Lamb and NVIDIA's NVLAMB / FusedLAMB (You et al., "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020, arXiv 1904.00962):
    g   <- g / max(1, ||g_all|| / max_grad_norm)               (optional global clipping)
    m   <- b1 m + (1 - b1) g        (grad averaging; b1 m + g without it)
    v   <- b2 v + (1 - b2) g^2
    a   =  (m / bc1) / (sqrt(v / bc2) + eps)                     (bias corrections bc = 1 - b^t)
    u   =  a + wd w          (L2 mode)   |   w <- (1 - lr wd) w, u = a   (decoupled mode)
    r   =  ||w|| / ||u||  (1 when either norm is 0; min(r, 1) with trust_clip)
    w   <- w - lr r u        (r = 1 where the group does not adapt)
A group adapts when its `adapt` flag is set; by default a group adapts when its weight decay is
not 0 (timm's rule), and conadv's parameter groups give BatchNorm/bias `adapt=False`.

Speed (ResNet-50 parameter set, benchmarks/optimizer_step.py):
- CPU: conadv's own fused kernel (optim/lamb_cpu.cpp, compiled on first use): two passes per
  tensor, ~18 ms against ~14 ms for torch's fused AdamW and 60-110 ms for timm's Lamb. Without
  a compiler it falls back to the path below (~32 ms).
- CUDA (and the CPU fallback): the moment update and `a` come from torch's fused Adam kernel run
  on a scratch buffer that holds -wd*w, so it leaves -u there; the rest is two foreach norms and
  one foreach addcmul. Pure foreach code pays a full memory pass per elementwise op, and
  torch.compile of the same step was slower still (66 ms on the CPU, after a 33 s compile).
No step() makes a host synchronisation on CUDA: norms, ratios and the clip factor stay on the
device (the CPU kernel reads them on the host, where there is no device to wait for). Without
grad averaging (which torch's fused Adam cannot express) a plain foreach path is used on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conadv.optim.cpu_kernels import lamb_kernel
from conadv.optim.multi_tensor import bucket_params, state_to_param_devices, trust_ratios


class LAMB(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, grad_averaging: bool = True,
                 max_grad_norm: float | None = None, decoupled_decay: bool = False,
                 trust_clip: bool = False, adapt: bool | None = None,
                 cpu_kernel: bool = True) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, decoupled_decay=decoupled_decay,
                        trust_clip=trust_clip, adapt=adapt)
        self.max_grad_norm = max_grad_norm
        self.cpu_kernel = cpu_kernel
        # per-parameter work buffers: reused every step, never part of the state_dict
        self._scratch: dict[Tensor, Tensor] = {}
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch keeps a loaded `step` on the CPU for optimizers that are neither fused nor
        capturable; this one's kernels want every state tensor beside its parameter."""
        super().load_state_dict(state_dict)
        state_to_param_devices(self)

    def _clip_divisor(self) -> Tensor | None:
        """max(1, ||all grads|| / max_grad_norm) as a device tensor (no host sync)."""
        if not self.max_grad_norm:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return (total / self.max_grad_norm).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._clip_divisor()
        for group in self.param_groups:
            for params in bucket_params(group["params"]):
                self._update(group, params, clip)
        return loss

    def _state(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return ([self.state[p]["step"] for p in params],
                [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params])

    def _scratch_for(self, params: list[Tensor]) -> list[Tensor]:
        for p in params:
            if p not in self._scratch:
                self._scratch[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return [self._scratch[p] for p in params]

    def _update(self, group: dict, params: list[Tensor], clip: Tensor | None) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        adapt = group["adapt"] if group["adapt"] is not None else wd != 0
        grads = [p.grad for p in params]
        steps, exp_avgs, exp_avg_sqs = self._state(params)
        torch._foreach_add_(steps, 1)
        kernel = lamb_kernel() if self.cpu_kernel and params[0].device.type == "cpu" else None
        if kernel is not None and params[0].dtype in (torch.float32, torch.float64):
            kernel.lamb_step(params, grads, exp_avgs, exp_avg_sqs, steps[0], lr, beta1, beta2,
                             eps, wd, group["decoupled_decay"], group["grad_averaging"], adapt,
                             group["trust_clip"], clip)
            return
        if group["decoupled_decay"] and wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        l2 = wd if not group["decoupled_decay"] else 0.0

        if group["grad_averaging"]:
            scratch = self._scratch_for(params)
            # scratch <- -l2 * w; the fused Adam step (lr=1) then subtracts a, leaving -u.
            if l2:
                for p, s in zip(params, scratch):
                    torch.mul(p, -l2, out=s)  # one pass; foreach_mul would allocate
            else:
                torch._foreach_zero_(scratch)
            if clip is not None and clip.dtype != torch.float32:
                # the kernel's grad_scale is float32; keep float64 clipping exact
                grads, clip = torch._foreach_div(grads, clip), None
            torch._fused_adam_(scratch, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1.0,
                               beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
                               amsgrad=False, maximize=False, grad_scale=clip, found_inf=None)
            neg_update = scratch
        else:
            neg_update = _foreach_lamb_direction(params, grads, exp_avgs, exp_avg_sqs, steps,
                                                 beta1, beta2, eps, l2, clip)
        if adapt:
            ratios = trust_ratios(torch._foreach_norm(params), torch._foreach_norm(neg_update))
            if group["trust_clip"]:
                ratios = ratios.clamp(max=1.0)
            torch._foreach_addcmul_(params, neg_update, list((ratios * lr).unbind()))
        else:
            torch._foreach_add_(params, neg_update, alpha=lr)


def _foreach_lamb_direction(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                            exp_avg_sqs: list[Tensor], steps: list[Tensor], beta1: float,
                            beta2: float, eps: float, l2: float,
                            clip: Tensor | None) -> list[Tensor]:
    """-u without grad averaging (m <- b1 m + g): the plain foreach path."""
    if clip is not None:
        grads = torch._foreach_div(grads, clip)
    step = steps[0].double()  # bias corrections in float64, as timm's Python floats
    bias1 = 1 - beta1 ** step
    bias2_sqrt = (1 - beta2 ** step).sqrt()
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    direction = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(direction, -bias1)
    if l2:
        torch._foreach_add_(direction, params, alpha=-l2)
    return direction
