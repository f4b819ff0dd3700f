"""Non-finite training: notice it without a host synchronisation per step, and either stop (the
default) or skip the optimizer steps it would poison.

Every step adds, on the device, whether its loss or its gradient norm is non-finite. The host
reads the counters only where it synchronises anyway: at logging steps and before a checkpoint
(`poll`, one small all-reduce). Under fp16 the GradScaler already skips steps whose scaled
gradients overflow (that is how it finds its scale), so only a non-finite loss counts there.

`skip` keeps the state of a bad step: the model's buffers (BatchNorm running statistics, which
the step's forward already wrote, main and auxiliary) are copied when the step begins, the
optimizers' tensors (parameters and their state) before the optimizer step, and both are put
back, on the device, where the step was bad (a `torch.where` per tensor). That costs a copy of
the parameters and optimizer state per step, so it is opt-in. Whether a step is bad is decided
for all ranks at once (a max over ranks on the device): a rank that undid a step the others
kept would leave the replicas apart, and DDP never re-synchronises parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from conadv.distributed import all_reduce_max, is_initialized
from conadv.errors import TrainingDiverged


@dataclass
class NonFiniteStatus:
    """What the ranks saw since the last poll (agreed over ranks)."""

    bad_steps: int  # steps with a non-finite loss or gradient norm (max over ranks)
    longest_run: int  # longest run of consecutive bad steps so far
    skipped_total: int  # optimizer steps skipped since the start of this process


class NonFiniteGuard:
    def __init__(self, device: torch.device, policy: str, check_gradients: bool,
                 buffers: Sequence[Tensor] = (), max_skipped_steps: int = 10) -> None:
        """`buffers`: the model's buffers, which `skip` restores after a bad step."""
        self.policy = policy
        self.max_skipped_steps = max_skipped_steps
        self.check_gradients = check_gradients
        self.buffers = list(buffers)
        self._saved_buffers: list[Tensor] = []
        self._bad_steps = torch.zeros((), dtype=torch.long, device=device)
        self._run = torch.zeros((), dtype=torch.long, device=device)
        self._longest_run = torch.zeros((), dtype=torch.long, device=device)
        self._skipped = torch.zeros((), dtype=torch.long, device=device)

    def begin_step(self) -> None:
        """Call before the step's first forward: under `skip`, keep the buffers it writes."""
        if self.policy == "skip":
            self._saved_buffers = [b.detach().clone() for b in self.buffers]

    def step_is_bad(self, loss: Tensor, parameters: Iterable[Tensor]) -> Tensor:
        """A 0-dim bool tensor: this step's loss or gradient norm is not finite on some rank."""
        bad = ~torch.isfinite(loss.detach())
        if self.check_gradients:
            grads = [p.grad for p in parameters if p.grad is not None]
            if grads:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
                bad = bad | ~torch.isfinite(norm)
        if self.policy == "skip" and is_initialized():  # one decision for every rank
            bad = all_reduce_max(bad.to(torch.int32)).bool()
        return bad

    def optimizer_step(self, step: Callable[[], None], bad: Tensor,
                       optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Run `step` (the step of every optimizer in `optimizers`); under `skip`, undo it on
        the device if `bad`."""
        bad_long = bad.long()
        self._bad_steps += bad_long
        self._run.mul_(bad_long).add_(bad_long)  # consecutive bad steps, 0 after a good one
        torch.maximum(self._longest_run, self._run, out=self._longest_run)
        if self.policy != "skip":
            step()
            return
        saved = {key: t.detach().clone() for key, t in _optimizer_tensors(optimizers).items()}
        step()
        for key, tensor in _optimizer_tensors(optimizers).items():
            # state the step created (first step) goes back to zeros, i.e. "not started"
            kept = saved[key] if key in saved else torch.zeros_like(tensor)
            tensor.copy_(torch.where(bad, kept, tensor))
        for buffer, kept in zip(self.buffers, self._saved_buffers):
            buffer.copy_(torch.where(bad, kept, buffer))
        self._saved_buffers = []
        self._skipped += bad_long

    def poll(self) -> NonFiniteStatus:
        """A collective: every rank calls it at the same step; resets the window counter."""
        values = torch.stack([self._bad_steps, self._longest_run, self._skipped])
        bad_steps, longest, skipped = all_reduce_max(values).tolist()
        self._bad_steps.zero_()
        return NonFiniteStatus(int(bad_steps), int(longest), int(skipped))


    def verdict(self, first_step: int, step: int,
                newest_checkpoint: Callable[[], Path | None]) -> int:
        """At logging and checkpoint steps (a collective): raise TrainingDiverged, one sentence
        the same on every rank, when training went non-finite since `first_step` (policy
        stop) or skipped too many steps in a row (policy skip); else return the number of
        steps skipped so far. `newest_checkpoint()` (a collective too) names where to resume."""
        status = self.poll()
        skip = self.policy == "skip"
        if not ((status.bad_steps and not skip)
                or (skip and status.longest_run > self.max_skipped_steps)):
            return status.skipped_total
        newest = newest_checkpoint()
        where = (f"the newest finite checkpoint is {newest}; resume it with "
                 "checkpoint.resume=auto and checkpoint.allow_config_change=true"
                 if newest else "no checkpoint was written yet; start again")
        steps = (f"at step {step}" if first_step == step
                 else f"between steps {first_step} and {step}")
        what = (f"{status.longest_run} optimizer steps in a row were skipped "
                f"(train.max_skipped_steps={self.max_skipped_steps})" if skip else
                f"the loss or gradient norm became non-finite {steps}")
        raise TrainingDiverged(f"training diverged: {what}; {where}, with a lower optim.lr "
                               "or a longer schedule.warmup_epochs")


def _optimizer_tensors(optimizers: Sequence[torch.optim.Optimizer]) -> dict[tuple, Tensor]:
    """Every tensor the optimizers' steps write: parameters and their state, keyed stably."""
    tensors: dict[tuple, Tensor] = {}
    for o, optimizer in enumerate(optimizers):
        for g, group in enumerate(optimizer.param_groups):
            for i, param in enumerate(group["params"]):
                tensors[(o, g, i, "param")] = param.data
                for name, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, Tensor):
                        tensors[(o, g, i, name)] = value
    return tensors


def first_non_finite(state: object, prefix: str = "") -> str | None:
    """The name of the first floating tensor with a NaN or infinity in a nested state."""
    if isinstance(state, Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return prefix or "tensor"
        return None
    items = (state.items() if isinstance(state, dict)
             else enumerate(state) if isinstance(state, (list, tuple)) else ())
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None
