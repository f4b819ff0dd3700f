"""The state of a run that a checkpoint holds, registered in one place for save and load.

Every part is global (the same on every rank, or summed over ranks), so one file written by
rank 0 restores a job on any number of ranks: the data position is a function of the step (see
`data.loader.BatchStream.seek`), and no random operation in the training loop draws from a
process-wide generator (augmentation, mixing and attacks are seeded by sample or batch keys).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
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


@dataclass
class Compute:
    """The passes a run's trajectory cost, over the whole job (every rank, attack ranks
    included), counted rather than timed, so runs on shared or different machines compare.
    Image passes: an image through the training forward and backward; through one attack step
    (a forward and a backward to the input); through each teacher's forward. Counted when a
    micro-batch is trained: a resume counts what the run trained, not what the interrupted
    attempt threw away, and the side work made ahead for steps past the end is not counted
    (tau x accumulation micro-batches)."""

    train_images: int = 0
    attack_image_steps: int = 0
    teacher_images: int = 0
    counted_from_step: int = 0  # a checkpoint from before counting began: counted since then

    def forward_equivalents(self) -> int:
        """The student's forward passes of one image, the usual FLOP convention: a training
        backward costs two forwards (activation and weight gradients), an attack's backward
        one (eager autograd follows the path to the input only and forms no weight gradient;
        a compiled attack's backward graph may form them too, about one forward more).
        Teachers are left out: they are other models, often larger; their images are counted
        on their own."""
        return 3 * self.train_images + 2 * self.attack_image_steps

    def summary(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "forward_equivalents": self.forward_equivalents()}


class Progress:
    """The run's counters: optimizer steps taken, unreadable images skipped (over all ranks),
    the compute spent."""

    def __init__(self, device: torch.device, is_main: bool, world_size: int = 1,
                 teachers: int = 0) -> None:
        self.device = device
        self.is_main = is_main
        self.step = 0
        self.bad_images = 0  # this rank's count (rank 0 also carries the restored total)
        self.compute = Compute()
        self._world_size, self._teachers = world_size, teachers

    def count(self, images: int, attack_image_steps: int, teacher_images: int) -> None:
        """One micro-batch of this rank; every rank trains as many rows, so the job's count
        is the rank's times the world (host integers: no synchronisation)."""
        world = self._world_size
        self.compute.train_images += images * world
        self.compute.attack_image_steps += attack_image_steps * world
        self.compute.teacher_images += teacher_images * self._teachers * world

    def total_bad_images(self) -> int:
        """A collective: every rank calls it."""
        count = torch.tensor(float(self.bad_images), device=self.device)
        return int(all_reduce_sum(count).item())

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "bad_images": self.total_bad_images(),
                "compute": dataclasses.asdict(self.compute)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not (is_count(state["step"]) and is_count(state["bad_images"])):
            raise ValueError("its step and bad_images are not counts")
        names = {f.name for f in dataclasses.fields(Compute)}
        compute = state.get("compute", {"counted_from_step": state["step"]})  # written before
        if not (isinstance(compute, dict) and set(compute) <= names  # counting began: from here
                and all(is_count(v) for v in compute.values())
                and compute.get("counted_from_step", 0) <= state["step"]):
            raise ValueError("its compute is not the counts conadv writes")
        self.step = state["step"]
        self.bad_images = state["bad_images"] if self.is_main else 0
        self.compute = Compute(**compute)  # a count added later starts at 0


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
