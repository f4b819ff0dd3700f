"""Weight EMA: an exponential moving average of the model's weights, evaluated beside them.

After every `every_steps`-th optimizer step, each averaged tensor moves towards the live one:
ema = decay * ema + (1 - decay) * live. With `warmup` the decay starts low and rises as
timm's ModelEmaV3 does by default, decay_n = min(decay, 1 - (1 + n) ** -(2/3)) for the n-th
update (0-based: the first update copies the weights), so that the average is not dominated by
the initial weights in a short run.

The average covers the parameters and the main BatchNorm's buffers (running statistics; the
batch counter is copied), never the auxiliary adversarial/augmented BatchNorms, which only
training uses. Written here rather than taken from `torch.optim.swa_utils.AveragedModel` or
timm's `ModelEmaV3`: both average every parameter and buffer of the module (the auxiliary
BatchNorms included), and AveragedModel reads its update counter back to the host at every
update (`if self.n_averaged == 0`), a synchronisation per step on a GPU. The update here is
one multi-tensor lerp with a decay computed on the host from a host counter.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from conadv.errors import CheckpointError
from conadv.models.multi_bn import MultiBatchNorm2d


def _auxiliary_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}.aux." if name else "aux." for name, module in model.named_modules()
                 if isinstance(module, MultiBatchNorm2d))


def averaged_names(model: nn.Module) -> list[str]:
    """The state-dict entries an EMA of `model` covers: every parameter and buffer but those of
    the auxiliary BatchNorms."""
    auxiliary = _auxiliary_prefixes(model)
    return [name for name in model.state_dict() if not name.startswith(auxiliary)]


class WeightEma:
    """The EMA of a model's weights, held in a copy of the model (`.model`, in eval mode) that
    evaluation, export and a teacher can use like any model."""

    def __init__(self, model: nn.Module, decay: float, every_steps: int = 1,
                 warmup: bool = False) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), not {decay}")
        self.decay, self.every_steps, self.warmup = decay, every_steps, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0  # on the host: the decay schedule never reads the device
        names = set(averaged_names(model))
        live, ema = model.state_dict(keep_vars=True), self.model.state_dict(keep_vars=True)
        self._pairs = [(ema[n], live[n].detach()) for n in live if n in names]
        # the lerp's two lists, built once (the tensors are updated in place, never replaced)
        self._averaged = [e for e, _ in self._pairs if e.is_floating_point()]
        self._targets = [v for e, v in self._pairs if e.is_floating_point()]

    @torch.no_grad()
    def restart_from(self, model: nn.Module) -> None:
        """Start the average again at `model`'s current weights."""
        for ema, live in self._pairs:
            ema.copy_(live)
        self.updates = 0

    def decay_now(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.updates) ** (-2.0 / 3.0))

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Call after optimizer step `step` (1-based: the steps done so far)."""
        if step % self.every_steps:
            return
        torch._foreach_lerp_(self._averaged, self._targets, 1.0 - self.decay_now())
        self.updates += 1

    @torch.no_grad()
    def _copy_counters(self) -> None:
        """BatchNorm's batch counters, copied when saved rather than at every update (evaluation
        never reads them; dozens of tiny copies per step would)."""
        for ema, live in self._pairs:
            if not ema.is_floating_point():
                ema.copy_(live)

    def state_dict(self) -> dict[str, Any]:
        self._copy_counters()
        names = set(averaged_names(self.model))
        return {"updates": self.updates,
                "weights": {n: t for n, t in self.model.state_dict().items() if n in names}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(averaged_names(self.model)) - set(state["weights"])
        if missing:
            raise CheckpointError(f"the checkpoint's weight EMA lacks {len(missing)} entries "
                                  f"of this model (e.g. {sorted(missing)[0]})")
        self.updates = int(state["updates"])
        # the auxiliary BatchNorms are not in it (and are never used by the EMA's model)
        self.model.load_state_dict(state["weights"], strict=False)
