"""The state of a run that a checkpoint holds, registered in one place for save and load.

Every part is global (the same on every rank, or summed over ranks), so one file written by
rank 0 restores a job on any number of ranks: the data position is a function of the step (see
`data.loader.BatchStream.seek`), and no random operation in the training loop draws from a
process-wide generator (augmentation, mixing and attacks are seeded by sample or batch keys).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

import torch

from conadv.distributed import all_reduce_sum
from conadv.errors import CheckpointError, collapsed
from conadv.fileio import is_count

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class RunState:
    """Named stateful parts; `state_dict` and `load_state_dict` walk the same registry."""

    def __init__(self) -> None:
        self._parts: dict[str, Stateful] = {}

    def register(self, name: str, part: Stateful) -> None:
        self._parts[name] = part

    def state_dict(self) -> dict[str, Any]:
        """References to the live state (copy before the parts change). Call on every rank:
        parts may sum counters over ranks."""
        return {name: part.state_dict() for name, part in self._parts.items()}

    def load_state_dict(self, state: dict[str, Any], skip: set[str] = frozenset(),
                        strict: bool = True) -> None:
        """Load every registered part but those in `skip`; `strict=False` is passed on to the
        parts that take it (after an allowed config change, keys may differ)."""
        for name, part in self._parts.items():
            if name in skip:
                continue
            if name not in state and not strict:
                log.warning("the checkpoint holds no %s; it starts afresh", name)
                continue
            if name not in state:
                raise CheckpointError(f"the checkpoint holds no {name} state")
            takes_strict = "strict" in inspect.signature(part.load_state_dict).parameters
            try:
                if takes_strict:
                    part.load_state_dict(state[name], strict=strict)
                else:
                    part.load_state_dict(state[name])
            except (KeyError, TypeError, ValueError, IndexError, AttributeError,
                    RuntimeError) as err:  # what torch and the parts raise on foreign content
                raise CheckpointError(f"the checkpoint's {name} state does not fit this run "
                                      f"({type(err).__name__}: {collapsed(err)})") from None


class Progress:
    """The run's counters: optimizer steps taken, unreadable images skipped (over all ranks)."""

    def __init__(self, device: torch.device, is_main: bool) -> None:
        self.device = device
        self.is_main = is_main
        self.step = 0
        self.bad_images = 0  # this rank's count (rank 0 also carries the restored total)

    def total_bad_images(self) -> int:
        """A collective: every rank calls it."""
        count = torch.tensor(float(self.bad_images), device=self.device)
        return int(all_reduce_sum(count).item())

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "bad_images": self.total_bad_images()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not (is_count(state["step"]) and is_count(state["bad_images"])):
            raise ValueError("its step and bad_images are not counts")
        self.step = state["step"]
        self.bad_images = state["bad_images"] if self.is_main else 0


class OptimizerState:
    """An optimizer's checkpoint state, with its hyper-parameters taken from the config: moments
    and step counts are restored, the param-group settings (decay, momentum, betas...) stay as
    built, so a config change allowed on resume takes effect. The learning rate is the
    scheduler's."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """`strict=False` (an allowed config change): when the parameters differ (e.g. ConAdv's
        auxiliary BatchNorm was added), the optimizer starts with fresh moments."""
        saved_sizes = [len(group["params"]) for group in state["param_groups"]]
        if not strict and saved_sizes != [len(g["params"]) for g in self.optimizer.param_groups]:
            log.warning("the model's parameters changed since the checkpoint; the optimizer "
                        "starts with fresh moments")
            return
        settings = [{k: v for k, v in group.items() if k != "params"}
                    for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, setting in zip(self.optimizer.param_groups, settings):
            group.update(setting)
