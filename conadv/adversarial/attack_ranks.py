"""Attack ranks: ConAdv's attack on processors of its own (adv.attack_ranks).

ConAdv's attack for the batch of step t + tau needs only the weights of step t and that batch,
so it can run on another device while the trainers compute step t. A job with N attack ranks
splits its world: ranks 0..T-1 train (data parallel, they own the global batch and the
optimizer), the last N attack (conadv.config.trainer_count says why the last). Every step:

1. at the start of step t, trainer 0 broadcasts a control word (go, t, first, last, weight
   count) and the weights of step t (every parameter, auxiliary BatchNorm included; fp32 or
   bf16) to the attack ranks over a group of their own (`JobGroups.weights`); at the end of
   the run it broadcasts a stop word instead;
2. attack rank a serves trainers r with r % N == a: it reads their micro-batches of steps
   first..last through the same sampler (a trainer's batch key fixes its images, labels and
   attack randomness), attacks each with the weights of step t, holds them, and sends the
   views of steps up to t + 1 to their trainers (point to point, in the order the trainers
   ask for them: views made tau steps ahead wait on the attack rank, not in sends that an
   evaluation could leave unmatched past their deadline), each after
   a header (batch key, checksums of the sample indices and labels) over the team's gloo group
   (`JobGroups.headers`: the attack rank and its trainers), which the trainer checks on the
   host against the micro-batch it trains, so attack ranks reading other data fail in one
   sentence instead of training another image's views;
3. the trainer queues the batch at step t (for step t + tau), posts its receives during the
   step before the one that trains it, when the attack rank sends (so at most 2 x accumulation
   receives are pending beside DDP's all-reduces, whatever tau), and waits for them only when
   the batch is trained.

Nobody waits forever. A trainer waits for a view at most 0.9 x dist.timeout_s from posting its
receive (then one sentence names the attack rank, before NCCL's watchdog aborts the process).
An attack rank waits 0.9 x dist.timeout_s from a send for the trainer to take it (one sentence
names the trainer; the header goes first, on gloo, so this comes before NCCL's watchdog too),
and for the next step without a deadline (it spans evaluations and checkpoints) but watching
trainer 0's heartbeat in the job's store, so a trainer 0 that died or froze without a word
(SIGKILL, an OOM kill, a watchdog abort, a node off the network) ends it within dist.timeout_s
and a heartbeat period or two (a store that no longer answers counts as no heartbeat, after the
store's own timeout).

An attack is a pure function of (weights of its source step, batch, batch key), so with fp32
weights a run with attack ranks trains the same numbers as the same run without them. The
attack ranks keep no state: a checkpoint is the trainers' (the queue's source steps and their
weights, as without attack ranks); after a resume the trainers remake the replayed attacks
themselves and the attack ranks start at the first fresh step: (first, last) is (t, t + tau)
at a new start and (t + tau, t + tau) afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from conadv.config import AdvConfig
from conadv.distributed import DistEnv, JobGroups, attacker_of
from conadv.errors import ConfigError, UserError, first_line
from conadv.streams import streams_for

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the control word's first field
STOP, GO, FAILED = 0, 1, 2
HEARTBEAT_KEY = "conadv/trainer0_heartbeat"


class AttackRankLost(UserError):
    """An attack rank stopped sending adversarial views (it died or hangs)."""


class TrainersFailed(UserError):
    """The trainers ended with an error (or trainer 0 is gone); the attack ranks leave too."""


class ViewMismatch(UserError):
    """An attack rank attacked another batch than the trainer trains: the two read other data."""


def flatten(parameters: Iterable[Tensor], dtype: torch.dtype) -> Tensor:
    """Every parameter in one contiguous buffer of `dtype` (a copy: the optimizer may write the
    parameters while the buffer is sent)."""
    return torch.cat([p.detach().reshape(-1).to(dtype) for p in parameters])


@torch.no_grad()
def unflatten_into(flat: Tensor, parameters: Iterable[Tensor]) -> None:
    """The inverse of flatten: the broadcast weights into the attack rank's parameters."""
    offset = 0
    for p in parameters:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def checksum(values: Tensor) -> int:
    """Integers (sample indices, class labels) in one number that changes when one of them
    changes or they are reordered; integer arithmetic, so every dtype and reduction order gives
    the same number. The loaders hand both over on the host, so this reads no GPU memory."""
    flat = values.reshape(-1).to(torch.int64)
    return int((flat * (torch.arange(flat.numel()) % 1021 + 1)).sum())


def view_header(key: int, batch: dict[str, Tensor]) -> Tensor:
    """What identifies a micro-batch: its key, and checksums of the sample indices the loader
    served (an unreadable image skipped on one side only changes them) and of its labels."""
    return torch.tensor([key, checksum(batch["index"]), checksum(batch["label"])],
                        dtype=torch.int64)


def check_header(header: Tensor, expected: Tensor, source: int, step: int) -> None:
    """One sentence when an attack rank sent the views of another micro-batch than the one the
    trainer trains (both headers from view_header)."""
    if torch.equal(header, expected):
        return
    sent, wanted = header.tolist(), expected.tolist()
    mismatch = ViewMismatch(
        f"attack rank {source} sent the views of batch key {sent[0]} (index and label "
        f"checksums {sent[1]}, {sent[2]}) for step {step}'s batch key {wanted[0]} "
        f"({wanted[1]}, {wanted[2]}): it reads other data than this trainer (another data "
        "index, or an unreadable image skipped on one side only); give the attack ranks the "
        "trainers' data and data.bad_images=fail")
    log.error("%s", mismatch)
    raise mismatch


class Heartbeat:
    """Trainer 0's pulse in the job's store, from a daemon thread. The attack ranks wait for
    the next step without a deadline (evaluations and checkpoints come between steps), so the
    pulse is how they tell a busy trainer 0 from one that died without running any cleanup.
    A store that fails to answer is retried: a pulse that stopped for good would end the
    attack ranks."""

    def __init__(self, store: Any, period_s: float) -> None:
        self._store, self._period_s = store, period_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="conadv-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        warned = False
        while not self._stopped.is_set():
            try:
                self._store.add(HEARTBEAT_KEY, 1)
            except Exception as err:
                if not warned:
                    log.warning("trainer 0's heartbeat did not reach the job's store (%s); "
                                "retrying", first_line(err))
                    warned = True
            self._stopped.wait(self._period_s)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._period_s)


class HeartbeatWatch:
    """An attack rank's view of trainer 0's heartbeat: check() raises TrainersFailed once the
    pulse has not moved for `timeout_s` on this rank's own clock (no clock is shared). A read
    that fails counts as no pulse, so a store that is gone ends the rank in the same time."""

    def __init__(self, store: Any, timeout_s: float, period_s: float) -> None:
        self._store, self._timeout_s, self._period_s = store, timeout_s, period_s
        self._seen: int | None = None
        self._since = self._next_read = time.monotonic()
        self._store_error = ""

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next_read:
            return
        self._next_read = now + self._period_s
        try:
            beat = self._store.add(HEARTBEAT_KEY, 0)
            self._store_error = ""
        except Exception as err:
            beat = self._seen
            self._store_error = first_line(err)
        if beat != self._seen:
            self._seen, self._since = beat, now
        elif now - self._since > self._timeout_s:
            store = (f"; the job's store does not answer: {self._store_error}"
                     if self._store_error else "")
            raise TrainersFailed(f"trainer 0 has not been heard from for "
                                 f"{now - self._since:.0f} s (dist.timeout_s="
                                 f"{self._timeout_s:.0f}{store}): it died, froze or its node is "
                                 "gone; this attack rank ends with it")


def heartbeat_period(timeout_s: float) -> float:
    """Ten pulses per timeout, at most one every 10 s (the store serves every attack rank)."""
    return min(10.0, timeout_s / 10)


@dataclass
class Incoming:
    """A posted receive of one micro-batch's adversarial images and their header."""

    images: Tensor
    work: Any
    header: Tensor
    header_work: Any
    expected: Tensor  # the view_header of the micro-batch this trainer trains
    source: int  # the attack rank
    step: int  # the step whose weights make it
    posted_at: float  # time.perf_counter() at the post: NCCL's watchdog counts from then


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
        # trainer 0: the broadcasts in flight, one list per announce (kept alive until done)
        self._outgoing: list[list[tuple[Any, Tensor]]] = []
        self._nccl = is_nccl()
        self._heartbeat = (Heartbeat(groups.store, heartbeat_period(timeout_s))
                           if env.rank == 0 else None)

    def announce(self, step: int, first: int, last: int, parameters: Iterable[Tensor]) -> None:
        """Start of step `step`: the attack ranks make steps first..last with its weights."""
        self.counters.steps += 1
        if self.rank != 0:
            return
        # NCCL: the host waits (with a deadline) for the weights of two steps back, never for
        # its GPU's current work; gloo: for the previous step's, which the attack ranks took
        self._finish_outgoing(keep=1 if self._nccl else 0)
        generation: list[tuple[Any, Tensor]] = []
        flat = flatten(parameters, self.dtype)
        control = self._control([GO, step, first, last, flat.numel()], generation)
        for tensor in (control, flat):
            work = dist.broadcast(tensor, src=0, group=self.groups.weights, async_op=True)
            generation.append((work, tensor))
        self._outgoing.append(generation)
        self.counters.weights_out += flat.numel() * flat.element_size()

    def _control(self, words: list[int], keep: list[tuple[Any, Tensor]]) -> Tensor:
        """The control word on the link's device without a host synchronisation (a copy from
        pageable memory would wait for the GPU every step): from pinned memory, kept alive in
        `keep` with the broadcast that sends it."""
        host = torch.tensor(words, dtype=torch.int64)
        streams = streams_for(self.device)
        if streams is None:
            return host
        pinned = streams.pin(host)
        keep.append((None, pinned))
        return pinned.to(self.device, non_blocking=True)

    def receive(self, batch: dict[str, Tensor], key: int, step: int) -> Incoming:
        """Post the receive of one micro-batch's adversarial images (made with the weights of
        `step`) and of their header; they arrive while the trainer works on earlier steps."""
        header = torch.empty(3, dtype=torch.int64)
        header_work = dist.irecv(header, src=self.source, group=self.groups.headers)
        images = torch.empty(batch["image"].shape, dtype=torch.float32, device=self.device)
        work = dist.irecv(images, src=self.source)
        self.counters.images_in += images.numel() * images.element_size()
        return Incoming(images, work, header, header_work, view_header(key, batch), self.source,
                        step, time.perf_counter())

    def consume(self, incoming: Incoming) -> Tensor:
        """The adversarial images, once they are here (or one sentence naming the attack rank
        that did not send them in time, or that attacked another batch)."""
        start = time.perf_counter()
        # polled against a deadline shorter than the collective timeout, counted from the
        # post as NCCL's watchdog counts, so this sentence comes before the watchdog aborts
        # the process; then wait() orders the current stream after the receive (gloo
        # completes a receive only inside wait(), which takes the time left itself)
        deadline = incoming.posted_at + 0.9 * self.timeout.total_seconds()
        try:
            incoming.header_work.wait(_time_left(deadline))
            check_header(incoming.header, incoming.expected, incoming.source, incoming.step)
            wait_until(incoming.work, deadline, polled=self._nccl)
        except RuntimeError as err:
            others = (" (or another attack rank holding up trainer 0's weights broadcast)"
                      if self.attackers > 1 else "")
            raise _lost(f"attack rank {incoming.source}{others} did not send the adversarial "
                        f"images made at step {incoming.step} within 0.9 x dist.timeout_s="
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
            self._finish_outgoing(keep=0)
            pinned: list[tuple[Any, Tensor]] = []
            work = dist.broadcast(self._control([word, int(terminated), 0, 0, 0], pinned),
                                  src=0, group=self.groups.weights, async_op=True)
            # the weights group has no deadline of its own (see distributed.py)
            deadline = _deadline(self.timeout.total_seconds())
            try:
                wait_until(work, deadline, polled=self._nccl)
            except RuntimeError as err:
                raise _lost("an attack rank did not take the stop word", err) from err
        except (RuntimeError, AttackRankLost):
            if not failed:
                raise
            log.warning("could not tell the attack ranks to stop; they end with the job")
        finally:
            self._heartbeat.stop()

    def _finish_outgoing(self, keep: int) -> None:
        """Wait for the broadcasts of all but the newest `keep` announces. The weights group
        has no deadline of its own (see distributed.py), so neither has NCCL's watchdog for
        it: polled against one here."""
        deadline = _deadline(self.timeout.total_seconds())
        try:
            while len(self._outgoing) > keep:
                for work, _ in self._outgoing[0]:
                    if work is not None:
                        wait_until(work, deadline, polled=self._nccl)
                self._outgoing.pop(0)
        except RuntimeError as err:
            last = self.trainers + self.attackers - 1
            ranks = f"rank {last}" if self.attackers == 1 else f"ranks {self.trainers}-{last}"
            raise _lost(f"an attack rank ({ranks}) did not take the weights", err) from err


def is_nccl(group: Any = None) -> bool:
    """Whether `group` (the default one: None) runs on NCCL, whose work.wait() only orders the
    current stream (gloo's blocks the host, and a gloo receive completes only inside wait(),
    so polling is_completed() would spin to the deadline)."""
    return dist.is_initialized() and dist.get_backend(group) == "nccl"


def wait_until(work: Any, deadline: float, polled: bool,
               watch: Callable[[], None] | None = None) -> None:
    """Wait for asynchronous collective work until `deadline` (time.perf_counter()), else
    RuntimeError. `polled`: poll is_completed() (a CUDA stream's work, whose wait() only orders
    the stream, or a wait that must `watch` something meanwhile: trainer 0's heartbeat), then
    wait() orders the current stream after it; otherwise gloo's wait with the time left."""
    if not polled:
        work.wait(_time_left(deadline))
        return
    while not work.is_completed():
        if watch is not None:
            watch()
        if time.perf_counter() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.0005)
    work.wait()


def _deadline(timeout_s: float) -> float:
    """0.9 x dist.timeout_s from now (time.perf_counter()): the weights group has no deadline
    of its own, and a sentence must come before NCCL's watchdog ends the process."""
    return time.perf_counter() + 0.9 * timeout_s


def _time_left(deadline: float) -> timedelta:
    """A gloo wait's timeout to a time.perf_counter() deadline (at least 1 s: a wait of 0
    would fail a transfer that is done but not yet collected)."""
    return timedelta(seconds=max(1.0, deadline - time.perf_counter()))


def _lost(what: str, err: RuntimeError) -> AttackRankLost:
    """The one sentence a trainer ends with when an attack rank is gone, logged at once (the
    launcher may kill this process before the error reaches the command line)."""
    lost = AttackRankLost(f"{what} ({first_line(err)}); the job ends and resumes from its newest "
                          "checkpoint under a restarting launcher")
    log.error("%s", lost)
    return lost


class AttackOrders:
    """The attack ranks' side of the link: the orders trainer 0 broadcasts (each with the
    weights to attack with) and the sends of the adversarial views back to the trainers."""

    def __init__(self, adv: AdvConfig, groups: JobGroups, parameters: list[Tensor],
                 timeout_s: int, device: torch.device) -> None:
        self.groups, self.parameters = groups, parameters
        self.flat = torch.empty(sum(p.numel() for p in parameters),
                                dtype=WEIGHT_DTYPES[adv.attack_weights], device=device)
        self.control = torch.zeros(5, dtype=torch.int64, device=device)
        self.terminated = False  # whether a stop signal ended the run (known at STOP)
        self.timeout_s = timeout_s
        self._trainer0 = HeartbeatWatch(groups.store, timeout_s, heartbeat_period(timeout_s))
        self._sends: list[_Send] = []  # in flight
        self._held: deque[tuple[int, Tensor, Tensor, int]] = deque()  # (step, views, header, to)
        self.step = -1  # the step of the last order
        self._nccl = is_nccl()

    def next(self) -> tuple[int, int] | None:
        """Wait for trainer 0's next word. GO: the parameters now hold the step's weights and
        (first, last) are the steps to make; STOP: None; FAILED: TrainersFailed (the failing
        trainers skip the final barrier, so leave now)."""
        # the word is posted before the last sends are awaited: a trainer that failed never
        # takes them, and then the FAILED word, not a send timeout, says why
        work = dist.broadcast(self.control, src=0, group=self.groups.weights, async_op=True)
        try:
            self._finish_sends()
        except TrainersFailed:
            if work.is_completed():
                work.wait()
                if int(self.control[0]) == FAILED:
                    raise _trainers_failed() from None
            raise
        while not work.is_completed():
            self._trainer0.check()
            time.sleep(0.001)
        work.wait()
        word, self.step, first, last, size = self.control.tolist()
        step = self.step
        if word == FAILED:
            raise _trainers_failed()
        if word == STOP:
            self.terminated = bool(step)  # the stop word's second field
            return None
        if size != self.flat.numel():
            raise ConfigError(f"trainer 0 sends {size} weights but this attack rank's model has "
                              f"{self.flat.numel()}: the ranks run different model configs or "
                              "code versions")
        # trainer 0 sends the weights right after the word: watched like the word, and given
        # 0.9 x dist.timeout_s (the weights group has no deadline of its own)
        work = dist.broadcast(self.flat, src=0, group=self.groups.weights, async_op=True)
        try:
            wait_until(work, _deadline(self.timeout_s), polled=True,
                       watch=self._trainer0.check)
        except RuntimeError as err:
            raise TrainersFailed(f"trainer 0 did not send step {step}'s weights within 0.9 x "
                                 f"dist.timeout_s={self.timeout_s} s ({first_line(err)}); this "
                                 "attack rank ends with it") from err
        unflatten_into(self.flat, self.parameters)
        return first, last

    def hold(self, step: int, images: Tensor, header: Tensor, trainer: int) -> None:
        """One micro-batch's adversarial views for `step` (and their view_header), kept until
        the trainer asks for them: a trainer posts the receives of a step's views one step
        before it trains them, so views made tau steps ahead wait here (on the attack rank's
        device), not in sends that an evaluation or a checkpoint on the trainers could leave
        unmatched past their deadline."""
        self._held.append((step, images.contiguous(), header, trainer))

    def release(self) -> None:
        """Send the held views the trainers asked for by now (trained at the last order's step
        or the next), in the order they were made: the order each trainer receives in."""
        while self._held and self._held[0][0] <= self.step + 1:
            _, images, header, trainer = self._held.popleft()
            now = time.perf_counter()
            self._sends.append(_Send(dist.isend(header, dst=trainer, group=self.groups.headers),
                                     header, trainer, now, on_host=True))
            self._sends.append(_Send(dist.isend(images, dst=trainer), images, trainer, now,
                                     on_host=not self._nccl))

    def _finish_sends(self) -> None:
        """The views sent for the last order are taken, or one sentence naming the trainer
        that did not take them within 0.9 x dist.timeout_s of the send. The header goes first
        and on gloo, so under NCCL too its deadline comes before the watchdog's; an image send
        on a GPU is only waited for by the stream."""
        for send in self._sends:
            deadline = send.posted_at + 0.9 * self.timeout_s
            try:
                if send.on_host:
                    send.work.wait(_time_left(deadline))
                else:
                    send.work.wait()
            except RuntimeError as err:
                raise TrainersFailed(
                    f"trainer {send.trainer} did not take its adversarial views within 0.9 x "
                    f"dist.timeout_s={self.timeout_s} s ({first_line(err)}): "
                    "it failed, died, froze or its node is gone; this attack rank ends with "
                    "it") from err
        self._sends.clear()


@dataclass
class _Send:
    """A view (or its header) on its way to a trainer, kept alive until it is taken."""

    work: Any
    tensor: Tensor
    trainer: int
    posted_at: float
    on_host: bool  # a gloo send, waited for on the host (else a CUDA stream waits for it)


def _trainers_failed() -> TrainersFailed:
    return TrainersFailed("the trainers ended with an error (see trainer 0's log); this attack "
                          "rank ends with them")

