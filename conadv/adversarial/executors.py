"""Where the side work of a batch (the attack, the teachers) runs: on its own stream, inline
in the caller's order (the CPU; same operations, same order, so CPU results are the reference
for the CUDA ones), or on the job's attack ranks (adv.attack_ranks).

Ordering of the stream executor (see conadv/streams.py for the rules):
- a job launched during step t waits for the event recorded after optimizer step t-1, so it
  reads exactly the weights of step t; before the first optimizer step (a new run or a resume)
  it waits for everything queued so far on the main stream (weights loaded from a checkpoint,
  DDP's initial broadcast);
- inputs made on another stream (a batch decoded on the GPU) are waited for by the job itself
  (`conadv.data.device.batch_to_device`);
- the consumer of a job's tensors waits for its done-event and marks the tensors as used by its
  stream (record_stream), so their memory is not reused early;
- before optimizer step t writes the weights in place, the main stream waits for every job
  launched during step t.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from conadv.errors import ConfigError
from conadv.streams import DeviceStreams, streams_for

if TYPE_CHECKING:
    from conadv.adversarial.attack_ranks import AttackLink


@dataclass
class FreshBatch:
    """A micro-batch attacked with the weights of the step that feeds it (not a replay after a
    resume): all an executor on other ranks needs to make the same attack there."""

    batch: dict[str, Tensor]
    key: int
    step: int


@dataclass
class Launched:
    """A job's result and, on a stream, the event that marks it done."""

    value: Any
    done: Any = None
    seconds: float = 0.0  # host time spent launching (CPU: the whole job); remote: the wait
    events: tuple[Any, Any] | None = field(default=None, repr=False)  # device start/end timing
    fresh: FreshBatch | None = None  # made on an attack rank: which micro-batch
    incoming: Any = None  # ... and the posted receive of its views (AttackLink.receive)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class _LocalExecutor:
    """What an executor that runs every job on this rank does not need to hear about."""

    def begin_step(self, step: int, first: int, last: int,
                   parameters: Iterable[Tensor]) -> None:
        """Step `step` starts; its weights attack the fresh batches of steps first..last."""

    def drain(self) -> None:
        """End of a clean run (the jobs in flight are waited for by whoever takes them)."""

    def summary(self) -> dict[str, Any]:
        """What this executor adds to the run summary."""
        return {}


class SequentialExecutor(_LocalExecutor):
    """Runs each job at once, in the caller's order (CPU, or CUDA without overlap)."""

    def launch(self, job: Callable[[], Any], fresh: FreshBatch | None = None) -> Launched:
        start = time.perf_counter()
        value = job()
        return Launched(value, seconds=time.perf_counter() - start)

    def consume(self, launched: Launched) -> Any:
        return launched.value

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class StreamExecutor(_LocalExecutor):
    """Runs jobs on a dedicated stream, concurrently with the main stream."""

    def __init__(self, streams: DeviceStreams, timing: bool = True) -> None:
        self.streams = streams
        self.stream = streams.new_stream()
        self.timing = timing
        self._weights_ready: Any = None
        self._in_flight: list[Any] = []

    def launch(self, job: Callable[[], Any], fresh: FreshBatch | None = None) -> Launched:
        start_time = time.perf_counter()
        main = self.streams.current()
        with self.streams.use(self.stream):
            if self._weights_ready is not None:
                self.stream.wait_event(self._weights_ready)
            else:
                self.stream.wait_stream(main)
            begin = self.streams.new_event(timing=True) if self.timing else None
            if begin is not None:
                begin.record(self.stream)
            value = job()
            done = self.streams.new_event(timing=self.timing)
            done.record(self.stream)
        self._in_flight.append(done)
        return Launched(value, done, time.perf_counter() - start_time,
                        (begin, done) if begin is not None else None)

    def consume(self, launched: Launched) -> Any:
        """Make the current stream wait for the job and own its tensors from now on."""
        current = self.streams.current()
        current.wait_event(launched.done)
        for tensor in _tensors(launched.value):
            self.streams.keep_alive(tensor, current)
        return launched.value

    def before_optimizer_step(self) -> None:
        current = self.streams.current()
        for event in self._in_flight:
            current.wait_event(event)
        self._in_flight.clear()

    def after_optimizer_step(self) -> None:
        self._weights_ready = self.streams.new_event()
        self._weights_ready.record(self.streams.current())

    def synchronize(self) -> None:
        self.stream.synchronize()


class AttackRankExecutor:
    """Fresh attacks are made on the attack ranks (conadv.adversarial.attack_ranks holds the
    protocol): launching one runs nothing here but queues the receive of its views, and
    consuming it waits for them. Replays after a resume (weights of past steps, which the
    attack ranks do not hold) run on the `local` executor, in the same queue order.

    Receives are posted for the micro-batches trained in this optimizer step or the next, in
    queue order: an attack rank sends a step's views, in that order, once the order of the step
    before reaches it (AttackOrders.release), so both sides post in the same step. Posting them
    all tau steps ahead would keep tau x A receives pending on the point-to-point communicator
    beside DDP's all-reduces (on NCCL, each a kernel that holds its GPU resources while it
    waits); one step ahead still gives a view a whole step to arrive before it is trained."""

    def __init__(self, local: SequentialExecutor | StreamExecutor, link: AttackLink,
                 accumulation: int, channels_last: bool) -> None:
        self.local, self.link = local, link
        self.accumulation, self.channels_last = accumulation, channels_last
        self._queue: deque[Launched] = deque()  # launched and not yet consumed, in order
        self._taken = 0  # consumed in this optimizer step

    def begin_step(self, step: int, first: int, last: int,
                   parameters: Iterable[Tensor]) -> None:
        """Trainer 0 sends the attack ranks this step's weights and the steps they attack."""
        self._taken = 0
        self.link.announce(step, first, last, parameters)
        self._post_due_receives()

    def launch(self, job: Callable[[], Any], fresh: FreshBatch | None = None) -> Launched:
        launched = self.local.launch(job) if fresh is None else Launched({}, fresh=fresh)
        self._queue.append(launched)
        self._post_due_receives()
        return launched

    def consume(self, launched: Launched) -> Any:
        self._post_due_receives()  # (posted already, unless launched in this very step)
        if self._queue.popleft() is not launched:
            raise RuntimeError("the attack ranks' views are taken in the order they were fed")
        self._taken += 1
        if launched.fresh is None:
            return self.local.consume(launched)
        # nothing ran on the local executor: the receive is ordered by the link alone
        start = time.perf_counter()
        adv = self.link.consume(launched.incoming)
        if self.channels_last:
            adv = adv.contiguous(memory_format=torch.channels_last)
        launched.seconds = time.perf_counter() - start
        return {"adv": adv}

    def _post_due_receives(self) -> None:
        for index, launched in enumerate(self._queue):
            if (self._taken + index) // self.accumulation > 1:
                break
            if launched.fresh is not None and launched.incoming is None:
                fresh = launched.fresh
                launched.incoming = self.link.receive(fresh.batch, fresh.key, fresh.step)

    def before_optimizer_step(self) -> None:
        self.local.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.local.after_optimizer_step()

    def synchronize(self) -> None:
        self.local.synchronize()

    def drain(self) -> None:
        """End of a clean run: take the views asked for (their sends must complete); the attack
        ranks drop the others at the end."""
        self.link.drain([q.incoming for q in self._queue if q.incoming is not None])

    def summary(self) -> dict[str, Any]:
        """What the attack ranks cost this trainer, per step."""
        counters, steps = self.link.counters, max(1, self.link.counters.steps)
        return {"attack_link": {
            "attack_ranks": self.link.attackers, "weights": self.link.weights,
            "weights_out_bytes_per_step": counters.weights_out / steps,
            "images_in_bytes_per_step": counters.images_in / steps,
            "wait_s_per_step": counters.wait_s / steps}}


Executor = SequentialExecutor | StreamExecutor | AttackRankExecutor


def build_executor(kind: str, device: torch.device, accumulation: int = 1,
                   channels_last: bool = False,
                   attack_link: AttackLink | None = None) -> Executor:
    """kind: auto (a side stream where the device has streams, inline on the CPU), stream, or
    sequential; with `attack_link` (adv.attack_ranks) fresh attacks come from the attack ranks
    and only replays run on that executor."""
    streams = streams_for(device)
    local: SequentialExecutor | StreamExecutor = SequentialExecutor()
    if kind == "stream" or (kind == "auto" and streams is not None):
        if streams is None:
            raise ConfigError("adv.executor=stream needs a CUDA device; use adv.executor=auto")
        local = StreamExecutor(streams)
    if attack_link is None:
        return local
    return AttackRankExecutor(local, attack_link, accumulation, channels_last)
