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
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from conadv.config import RunConfig, plan_batch
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

    def __init__(self, groups: JobGroups, env: DistEnv, trainers: int, weights: str,
                 timeout_s: int, device: torch.device) -> None:
        self.groups, self.rank, self.trainers = groups, env.rank, trainers
        self.attackers = env.world_size - trainers
        self.source = attacker_of(env.rank, trainers, self.attackers)
        self.dtype = WEIGHT_DTYPES[weights]
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


@dataclass
class AttackRank:
    """One attack rank: the model (weights replaced every step), the engine's attack, and a
    data stream per trainer it serves, positioned at the first step it is asked for."""

    cfg: RunConfig
    env: DistEnv
    device: torch.device
    groups: JobGroups
    trainers: int
    streams: dict[int, Any] = field(default_factory=dict)

    def run(self) -> tuple[int, bool]:
        """Serve the trainers until trainer 0 says stop; returns the steps served and whether
        a stop signal ended the run."""
        from conadv.adversarial import EngineContext, build_engine
        from conadv.data import build_train_stream
        from conadv.data.device import batch_to_device
        from conadv.models import build_model
        from conadv.train.runtime import autocast_dtype, autocast_factory, configure_determinism

        cfg, device = self.cfg, self.device
        attackers = self.env.world_size - self.trainers
        plan = plan_batch(cfg.train, self.trainers)
        configure_determinism(cfg.train.deterministic)
        served = served_by(self.env.rank, self.trainers, attackers)
        self.streams = {r: build_train_stream(cfg.data, self.trainers, r, plan.per_device,
                                              plan.accumulation, cfg.train.seed, device)
                        for r in served}
        num_classes = cfg.model.num_classes or next(iter(self.streams.values())).num_classes
        model = build_model(cfg.model, num_classes).to(device)
        autocast = autocast_factory(device, autocast_dtype(cfg.train.precision, device))
        # the trainers' engine, for its BatchNorm routes and its attack (run inline here)
        engine = build_engine(dataclasses.replace(cfg.adv, executor="sequential"), model,
                              EngineContext(device=device, num_classes=num_classes,
                                            seed=cfg.train.seed, accumulation=plan.accumulation,
                                            channels_last=cfg.model.channels_last,
                                            second_view=cfg.data.second_view,
                                            autocast=autocast, compile=cfg.train.compile))
        model.train()  # the attack normalises with batch statistics, as on the trainers
        parameters = list(model.parameters())
        flat = torch.empty(sum(p.numel() for p in parameters),
                           dtype=WEIGHT_DTYPES[cfg.adv.attack_weights], device=device)
        control = torch.zeros(4, dtype=torch.int64, device=device)
        positioned, served_steps = False, 0
        while True:
            dist.broadcast(control, src=0, group=self.groups.weights)
            word, step, first, last = control.tolist()
            if word == FAILED:  # leave now: the failing trainers skip the final barrier
                raise TrainersFailed("the trainers ended with an error (see trainer 0's log); "
                                     "this attack rank ends with them")
            if word == STOP:
                return served_steps, bool(step)  # the stop word's second field: terminated
            dist.broadcast(flat, src=0, group=self.groups.weights)
            unflatten_into(flat, parameters)
            if not positioned:
                for stream in self.streams.values():
                    stream.seek(first)
                positioned = True
            sends = []
            for _ in range(first, last + 1):
                for trainer, stream in self.streams.items():
                    for _ in range(plan.accumulation):
                        batch, key = stream.next()
                        moved = batch_to_device(batch, device, cfg.model.channels_last)
                        adv = engine.make_adversarial(model, moved["image"], moved["label"],
                                                      key).contiguous()
                        sends.append((dist.isend(adv, dst=trainer), adv))
            for work, _ in sends:
                work.wait()
            served_steps += 1


def run_attack_rank(cfg: RunConfig, env: DistEnv, device: torch.device, groups: JobGroups,
                    trainers: int) -> dict[str, Any]:
    """The body of an attack rank's process."""
    steps, terminated = AttackRank(cfg, env, device, groups, trainers).run()
    return {"terminated": terminated, "attack_rank": env.rank, "steps_served": steps}


def trainer_env(env: DistEnv, trainers: int) -> DistEnv:
    """A trainer's view of the job: the world is the trainers."""
    return dataclasses.replace(env, world_size=trainers)
