"""Attack ranks: ConAdv's attack on processors of its own (adv.attack_ranks).

ConAdv's attack for the batch of step t + tau needs only the weights of step t and that batch,
so it can run on another device while the trainers compute step t. A job with N attack ranks
splits its world: ranks 0..T-1 train (data parallel, they own the global batch and the
optimizer), the last N attack (conadv.config.trainer_count says why the last). Every step:

1. at the start of step t, trainer 0 broadcasts a control word (go, t, first, last) and the
   weights of step t (every parameter, auxiliary BatchNorm included; fp32 or bf16) to the
   attack ranks over a group of their own (`JobGroups.weights`); at the end of the run it
   broadcasts a stop word instead;
2. attack rank a serves trainers r with r % N == a: it reads their micro-batches of steps
   first..last through the same sampler (a trainer's batch key fixes its images, labels and
   attack randomness), attacks each with the weights of step t and sends the adversarial
   images to the trainer (point to point, in the order the trainer asks for them);
3. the trainer posts the receive when it queues the batch (at step t, for step t + tau) and
   waits for it only when the batch is trained, tau steps later.

An attack is a pure function of (weights of its source step, batch, batch key), so with fp32
weights a run with attack ranks trains the same numbers as the same run without them. The
attack ranks keep no state: a checkpoint is the trainers' (the queue's source steps and their
weights, as without attack ranks); after a resume the trainers remake the replayed attacks
themselves and the attack ranks start at the first fresh step: (first, last) is (t, t + tau)
at a new start and (t + tau, t + tau) afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from conadv.config import AdvConfig
from conadv.distributed import DistEnv, JobGroups
from conadv.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the control word's first field
STOP, GO, FAILED = 0, 1, 2


class AttackRankLost(UserError):
    """An attack rank stopped sending adversarial views (it died or hangs)."""


class TrainersFailed(UserError):
    """The trainers ended with an error; the attack ranks leave too."""


def attacker_of(trainer: int, trainers: int, attackers: int) -> int:
    """The global rank of the attack rank that serves `trainer`."""
    return trainers + trainer % attackers


def served_by(attacker: int, trainers: int, attackers: int) -> list[int]:
    """The trainers the attack rank of global rank `attacker` serves."""
    return [r for r in range(trainers) if attacker_of(r, trainers, attackers) == attacker]


def flatten(parameters: Iterable[Tensor], dtype: torch.dtype) -> Tensor:
    """Every parameter in one contiguous buffer of `dtype` (a copy: the optimizer may write the
    parameters while the buffer is sent)."""
    return torch.cat([p.detach().reshape(-1).to(dtype) for p in parameters])


@torch.no_grad()
def unflatten_into(flat: Tensor, parameters: Iterable[Tensor]) -> None:
    offset = 0
    for p in parameters:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


@dataclass
class Incoming:
    """A posted receive of one micro-batch's adversarial images."""

    images: Tensor
    work: Any
    source: int  # the attack rank
    step: int  # the step whose weights make it


@dataclass
class LinkCounters:
    """Bytes the link moved, for the measurements (this rank's share)."""

    weights_out: int = 0
    images_in: int = 0
    wait_s: float = 0.0
    steps: int = 0


class AttackLink:
    """The trainers' side of the attack ranks: trainer 0 announces every step and its weights;
    every trainer receives its adversarial views from the attack rank that serves it."""

    def __init__(self, adv: AdvConfig, groups: JobGroups, env: DistEnv, trainers: int,
                 timeout_s: int, device: torch.device) -> None:
        self.groups, self.rank, self.trainers = groups, env.rank, trainers
        self.attackers = env.world_size - trainers
        self.source = attacker_of(env.rank, trainers, self.attackers)
        self.weights = adv.attack_weights
        self.dtype = WEIGHT_DTYPES[adv.attack_weights]
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device
        self.counters = LinkCounters()
        self._outgoing: list[tuple[Any, Tensor]] = []  # trainer 0: broadcasts in flight

    def announce(self, step: int, first: int, last: int, parameters: Iterable[Tensor]) -> None:
        """Start of step `step`: the attack ranks make steps first..last with its weights."""
        self.counters.steps += 1
        if self.rank != 0:
            return
        self._finish_outgoing()
        control = self._control([GO, step, first, last])
        flat = flatten(parameters, self.dtype)
        for tensor in (control, flat):
            work = dist.broadcast(tensor, src=0, group=self.groups.weights, async_op=True)
            self._outgoing.append((work, tensor))
        self.counters.weights_out += flat.numel() * flat.element_size()

    def _control(self, words: list[int]) -> Tensor:
        """The control word on the link's device without a host synchronisation (a copy from
        pageable memory would wait for the GPU every step): from pinned memory, kept alive with
        the broadcast that sends it."""
        host = torch.tensor(words, dtype=torch.int64)
        if self.device.type != "cuda":
            return host
        pinned = host.pin_memory()
        self._outgoing.append((None, pinned))
        return pinned.to(self.device, non_blocking=True)

    def receive(self, shape: torch.Size, step: int) -> Incoming:
        """Post the receive of one micro-batch's adversarial images (made with the weights of
        `step`); they arrive while the trainer works on earlier steps."""
        images = torch.empty(shape, dtype=torch.float32, device=self.device)
        work = dist.irecv(images, src=self.source)
        self.counters.images_in += images.numel() * images.element_size()
        return Incoming(images, work, self.source, step)

    def consume(self, incoming: Incoming) -> Tensor:
        """The adversarial images, once they are here (or one sentence naming the attack rank
        that did not send them within dist.timeout_s)."""
        start = time.perf_counter()
        # polled against a deadline shorter than the collective timeout, so this sentence
        # comes before NCCL's watchdog aborts the process (a late view is rare: it was posted
        # tau steps ago); then wait() orders the current stream after the receive
        # (gloo completes a receive only inside wait(), which takes the timeout itself)
        limit = 0.9 * self.timeout.total_seconds()
        deadline = start + limit
        try:
            if self.device.type == "cuda":
                while not incoming.work.is_completed():
                    if time.perf_counter() > deadline:
                        raise RuntimeError("timed out")
                    time.sleep(0.0005)
                incoming.work.wait()
            else:
                incoming.work.wait(timedelta(seconds=limit))
        except RuntimeError as err:
            raise _lost(f"attack rank {incoming.source} did not send the adversarial images "
                        f"made at step {incoming.step} within 0.9 x dist.timeout_s="
                        f"{self.timeout.total_seconds():.0f} s", err) from err
        self.counters.wait_s += time.perf_counter() - start
        return incoming.images

    def drain(self, pending: Iterable[Incoming]) -> None:
        """End of a clean run: take the views still in flight (their sends must complete)."""
        for incoming in pending:
            self.consume(incoming)

    def stop(self, failed: bool, terminated: bool = False) -> None:
        """Trainer 0 tells the attack ranks the run is over: after a clean end or a stop signal
        (`terminated`: they exit with the trainers' status 75), or after a trainer failed
        (`failed`: they leave at once, without the final barrier the failing trainers skip).
        Sent from train()'s `finally`, so a failure before the loop also reaches them."""
        if self.rank != 0:
            return
        word = FAILED if failed else STOP
        try:
            self._finish_outgoing()
            dist.broadcast(self._control([word, int(terminated), 0, 0]), src=0,
                           group=self.groups.weights)
        except (RuntimeError, AttackRankLost):
            if not failed:
                raise
            log.warning("could not tell the attack ranks to stop; they end with the job")

    def _finish_outgoing(self) -> None:
        try:
            for work, _ in self._outgoing:
                if work is not None:
                    work.wait()
        except RuntimeError as err:
            last = self.trainers + self.attackers - 1
            ranks = f"rank {last}" if self.attackers == 1 else f"ranks {self.trainers}-{last}"
            raise _lost(f"an attack rank ({ranks}) did not take the weights", err) from err
        self._outgoing.clear()


def _lost(what: str, err: RuntimeError) -> AttackRankLost:
    """The one sentence a trainer ends with when an attack rank is gone, logged at once (the
    launcher may kill this process before the error reaches the command line)."""
    reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    lost = AttackRankLost(f"{what} ({reason}); the job ends and resumes from its newest "
                          "checkpoint under a restarting launcher")
    log.error("%s", lost)
    return lost


class AttackOrders:
    """The attack ranks' side of the link: the orders trainer 0 broadcasts (each with the
    weights to attack with) and the sends of the adversarial views back to the trainers."""

    def __init__(self, adv: AdvConfig, groups: JobGroups, parameters: list[Tensor],
                 device: torch.device) -> None:
        self.groups, self.parameters = groups, parameters
        self.flat = torch.empty(sum(p.numel() for p in parameters),
                                dtype=WEIGHT_DTYPES[adv.attack_weights], device=device)
        self.control = torch.zeros(4, dtype=torch.int64, device=device)
        self.terminated = False  # whether a stop signal ended the run (known at STOP)
        self._sends: list[tuple[Any, Tensor]] = []

    def next(self) -> tuple[int, int] | None:
        """Wait for trainer 0's next word. GO: the parameters now hold the step's weights and
        (first, last) are the steps to make; STOP: None; FAILED: TrainersFailed (the failing
        trainers skip the final barrier, so leave now)."""
        self._finish_sends()
        dist.broadcast(self.control, src=0, group=self.groups.weights)
        word, step, first, last = self.control.tolist()
        if word == FAILED:
            raise TrainersFailed("the trainers ended with an error (see trainer 0's log); "
                                 "this attack rank ends with them")
        if word == STOP:
            self.terminated = bool(step)  # the stop word's second field
            return None
        dist.broadcast(self.flat, src=0, group=self.groups.weights)
        unflatten_into(self.flat, self.parameters)
        return first, last

    def send(self, images: Tensor, trainer: int) -> None:
        """One micro-batch's adversarial views to the trainer that asked for them (in the
        order it asks)."""
        images = images.contiguous()
        self._sends.append((dist.isend(images, dst=trainer), images))

    def _finish_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()


def trainer_env(env: DistEnv, trainers: int) -> DistEnv:
    """A trainer's view of the job: the world is the trainers."""
    return dataclasses.replace(env, world_size=trainers)
