"""Non-finite training: notice it without a host synchronisation per step, and either stop (the
default) or skip the optimizer steps it would poison, in a few device operations per step
whatever the size of the model (each operation is a kernel launch on a GPU, and at 96 images
per GPU launches, not arithmetic, bound the step).

Every step decides on the device whether its loss or its gradient norm is non-finite: one
multi-tensor norm of the gradients, summed with the loss, compared once. The flags are kept as
they are and counted only where the host synchronises anyway: at logging steps and before a
checkpoint (`poll`, one small all-reduce), or every `FOLD_EVERY` steps on the device. Under
fp16 the GradScaler already skips steps whose scaled gradients overflow (that is how it finds
its scale), so only a non-finite loss counts there.

`skip` keeps the state of a bad step: the model's buffers (BatchNorm running statistics, which
the step's forward already wrote, main and auxiliary) are copied when the step begins, the
optimizers' tensors (parameters and their state) before the optimizer step, and both are put
back, on the device, where the step was bad. The copies live in one flat buffer per dtype
(`_Snapshot`), so saving is one multi-tensor copy and putting back is a copy, one
`torch.where` per dtype and a copy back, whatever the number of tensors. That holds two extra
copies of the parameters, buffers and optimizer state on the device, so it is opt-in. Whether
a step is bad is decided for all ranks at once (a max over ranks on the device): a rank that
undid a step the others kept would leave the replicas apart, and DDP never re-synchronises
parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from conadv.distributed import all_reduce_max, is_initialized
from conadv.errors import TrainingDiverged

FOLD_EVERY = 256  # steps whose flags are kept before they are counted on the device


@dataclass
class NonFiniteStatus:
    """What the ranks saw since the last poll (agreed over ranks)."""

    bad_steps: int  # steps with a non-finite loss or gradient norm (max over ranks)
    longest_run: int  # longest run of consecutive bad steps so far
    skipped_total: int  # optimizer steps skipped since the start of this process


class _Snapshot:
    """Copies of a fixed list of tensors, in one flat buffer per (device, dtype): taken with one
    multi-tensor copy and put back where a step was bad with a copy, one `torch.where` per
    buffer and a copy back, however many tensors there are."""

    def __init__(self, tensors: Sequence[Tensor], keys: Sequence | None = None) -> None:
        """`keys`: a stable name of each tensor (what `keep_from` matches them by)."""
        self.tensors = list(tensors)
        self.keys = list(keys) if keys is not None else list(range(len(self.tensors)))
        self._saved: list[Tensor] = []  # flat buffers, filled with zeros ("not started")
        self._current: list[Tensor] = []
        self.saved_views: list[Tensor] = [torch.empty(0)] * len(self.tensors)
        self.current_views: list[Tensor] = [torch.empty(0)] * len(self.tensors)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, tensor in enumerate(self.tensors):
            groups.setdefault((tensor.device, tensor.dtype), []).append(index)
        for (device, dtype), indices in groups.items():
            sizes = [self.tensors[i].numel() for i in indices]
            saved = torch.zeros(sum(sizes), device=device, dtype=dtype)
            current = torch.empty_like(saved)
            self._saved.append(saved)
            self._current.append(current)
            for i, part, scratch in zip(indices, saved.split(sizes), current.split(sizes)):
                self.saved_views[i] = _laid_out_like(part, self.tensors[i])
                self.current_views[i] = _laid_out_like(scratch, self.tensors[i])

    def holds(self, tensors: Sequence[Tensor]) -> bool:
        return len(tensors) == len(self.tensors) and all(
            a is b for a, b in zip(tensors, self.tensors))

    @torch.no_grad()  # the parameters are among the tensors
    def save(self) -> None:
        if self.tensors:
            torch._foreach_copy_(self.saved_views, self.tensors)

    @torch.no_grad()
    def keep_from(self, older: _Snapshot) -> None:
        """Take over what `older` saved of the tensors both hold (by key)."""
        position = {key: i for i, key in enumerate(self.keys)}
        pairs = [(position[key], j) for j, key in enumerate(older.keys) if key in position]
        if pairs:
            torch._foreach_copy_([self.saved_views[i] for i, _ in pairs],
                                 [older.saved_views[j] for _, j in pairs])


def _laid_out_like(flat: Tensor, tensor: Tensor) -> Tensor:
    """`flat` viewed with `tensor`'s shape and, where it is dense (contiguous or channels-last),
    its strides: multi-tensor copies need matching layouts to stay one kernel per group."""
    dense = tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(
        memory_format=torch.channels_last))
    return flat.as_strided(tensor.size(), tensor.stride()) if dense else flat.view_as(tensor)


@torch.no_grad()
def _restore_where(bad: Tensor, snapshots: Sequence[_Snapshot]) -> None:
    """Every tensor of `snapshots` back to its saved value where `bad` (on the device)."""
    tensors = [t for s in snapshots for t in s.tensors]
    if not tensors:
        return
    current = [v for s in snapshots for v in s.current_views]
    torch._foreach_copy_(current, tensors)
    for snapshot in snapshots:
        for saved, scratch in zip(snapshot._saved, snapshot._current):
            torch.where(bad, saved, scratch, out=scratch)
    torch._foreach_copy_(tensors, current)


class NonFiniteGuard:
    def __init__(self, device: torch.device, policy: str, check_gradients: bool,
                 buffers: Sequence[Tensor] = (), max_skipped_steps: int = 10) -> None:
        """`buffers`: the model's buffers, which `skip` restores after a bad step."""
        self.policy = policy
        self.max_skipped_steps = max_skipped_steps
        self.check_gradients = check_gradients
        self._buffers = _Snapshot(buffers) if policy == "skip" else None
        self._optimizer: _Snapshot | None = None
        self._flags: list[Tensor] = []  # this window's per-step "bad", not yet counted
        # counted flags: [bad steps since the last poll, current run, longest run, skipped]
        self._counts = torch.zeros(4, dtype=torch.long, device=device)

    def begin_step(self) -> None:
        """Call before the step's first forward: under `skip`, keep the buffers it writes."""
        if self._buffers is not None:
            self._buffers.save()

    def step_is_bad(self, loss: Tensor, parameters: Iterable[Tensor]) -> Tensor:
        """A 0-dim bool tensor: this step's loss (detached) or gradient norm is not finite on
        some rank."""
        values = [loss]
        grads = ([p.grad for p in parameters if p.grad is not None]
                 if self.check_gradients else [])
        if grads:
            values += torch._foreach_norm(grads)
        # a sum, not a norm: NaN and infinities carry through it, and squares would overflow
        total = torch.stack(values).sum() if len(values) > 1 else loss
        # x - x is 0 for every finite x and NaN for NaN and both infinities (two operations;
        # torch.isfinite is five)
        bad = (total - total).ne(0)
        if self.policy == "skip" and is_initialized():  # one decision for every rank
            bad = all_reduce_max(bad.to(torch.int32)).bool()
        return bad

    def optimizer_step(self, step: Callable[[], None], bad: Tensor,
                       optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Run `step` (the step of every optimizer in `optimizers`); under `skip`, undo it on
        the device if `bad`."""
        self._flags.append(bad)
        if len(self._flags) >= FOLD_EVERY:
            self._fold()
        if self._buffers is None:
            step()
            return
        keys, tensors = _optimizer_tensors(optimizers)
        if self._optimizer is None or not self._optimizer.holds(tensors):
            self._optimizer = _Snapshot(tensors, keys)
        self._optimizer.save()
        step()
        keys, tensors = _optimizer_tensors(optimizers)
        if not self._optimizer.holds(tensors):
            # state the step created (first step) goes back to zeros, i.e. "not started"
            grown = _Snapshot(tensors, keys)
            grown.keep_from(self._optimizer)
            self._optimizer = grown
        _restore_where(bad, [self._buffers, self._optimizer])

    def _fold(self) -> None:
        """Count the kept flags on the device: bad steps, the run of bad steps they continue
        and the longest run so far (and skipped steps under `skip`)."""
        if not self._flags:
            return
        flags = torch.stack(self._flags)
        self._flags = []
        steps = torch.arange(len(flags), device=flags.device)
        # the last good step at or before each step (before the window: the carried run)
        last_good = torch.where(flags, -1 - self._counts[1], steps).cummax(0).values
        runs = steps - last_good
        bad = flags.sum()
        skipped = bad if self.policy == "skip" else torch.zeros_like(bad)
        self._counts += torch.stack([bad, runs[-1] - self._counts[1],
                                     runs.max().clamp(min=self._counts[2]) - self._counts[2],
                                     skipped])

    def poll(self) -> NonFiniteStatus:
        """A collective: every rank calls it at the same step; resets the window counter."""
        self._fold()
        values = torch.stack([self._counts[0], self._counts[2], self._counts[3]])
        bad_steps, longest, skipped = all_reduce_max(values).tolist()
        self._counts[0] = 0
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


def _optimizer_tensors(optimizers: Sequence[torch.optim.Optimizer]
                       ) -> tuple[list[tuple], list[Tensor]]:
    """Every tensor the optimizers' steps write (parameters and their state), with stable
    keys; the parameters themselves, not `.data` (an operation each)."""
    keys: list[tuple] = []
    tensors: list[Tensor] = []
    for o, optimizer in enumerate(optimizers):
        for g, group in enumerate(optimizer.param_groups):
            for i, param in enumerate(group["params"]):
                keys.append((o, g, i, "param"))
                tensors.append(param)
                for name, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, Tensor):
                        keys.append((o, g, i, name))
                        tensors.append(value)
    return keys, tensors


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
