"""Where the side work of a batch (the attack, the teachers) runs: on its own stream, or inline
in the caller's order (the CPU; same operations, same order, so CPU results are the reference
for the CUDA ones).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from conadv.errors import ConfigError
from conadv.streams import DeviceStreams, streams_for


@dataclass
class Launched:
    """A job's result and, on a stream, the event that marks it done."""

    value: Any
    done: Any = None
    seconds: float = 0.0  # host time spent launching (CPU: the whole job)
    events: tuple[Any, Any] | None = field(default=None, repr=False)  # device start/end timing


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class SequentialExecutor:
    """Runs each job at once, in the caller's order (CPU, or CUDA without overlap)."""

    def launch(self, job: Callable[[], Any]) -> Launched:
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


class StreamExecutor:
    """Runs jobs on a dedicated stream, concurrently with the main stream."""

    def __init__(self, streams: DeviceStreams, timing: bool = True) -> None:
        self.streams = streams
        self.stream = streams.new_stream()
        self.timing = timing
        self._weights_ready: Any = None
        self._in_flight: list[Any] = []

    def launch(self, job: Callable[[], Any]) -> Launched:
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


def build_executor(kind: str, device: torch.device) -> SequentialExecutor | StreamExecutor:
    """kind: auto (a side stream where the device has streams, inline on the CPU), stream, or
    sequential."""
    streams = streams_for(device)
    if kind == "stream" or (kind == "auto" and streams is not None):
        if streams is None:
            raise ConfigError("adv.executor=stream needs a CUDA device; use adv.executor=auto")
        return StreamExecutor(streams)
    return SequentialExecutor()
