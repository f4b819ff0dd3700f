"""Where the attack runs: on its own CUDA stream, or inline on the CPU (same operations, same
order, so CPU results are the reference for the CUDA ones).

Ordering on CUDA:
- an attack launched during step t waits for the event recorded after optimizer step t-1, so
  it reads exactly the weights of step t; before the first optimizer step (a new run or a
  resume) it waits for everything queued so far on the main stream (weights loaded from a
  checkpoint, DDP's initial broadcast);
- the future batch is copied to the device on the attack stream, so the attack is ordered
  after its copy;
- whoever consumes the attack's tensors on another stream waits for its done-event and records
  the tensors with the caching allocator (record_stream), so their memory is not reused early;
- before optimizer step t writes the weights in place, the main stream waits for every attack
  launched during step t.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from conadv.errors import ConfigError


@dataclass
class Launched:
    """An attack's result and, on CUDA, the event that marks it done."""

    value: Any
    done: torch.cuda.Event | None = None
    seconds: float = 0.0  # host time spent launching (CPU: the whole attack)
    events: tuple[Any, Any] | None = field(default=None, repr=False)  # CUDA start/end timing


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

    concurrent = False

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


class CudaStreamExecutor:
    """Runs jobs on a dedicated CUDA stream, concurrently with the main stream."""

    concurrent = True

    def __init__(self, device: torch.device, timing: bool = True) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.timing = timing
        self._weights_ready: torch.cuda.Event | None = None
        self._in_flight: list[torch.cuda.Event] = []

    def launch(self, job: Callable[[], Any]) -> Launched:
        start_time = time.perf_counter()
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            if self._weights_ready is not None:
                self.stream.wait_event(self._weights_ready)
            else:
                self.stream.wait_stream(main)
            begin = torch.cuda.Event(enable_timing=True) if self.timing else None
            if begin is not None:
                begin.record(self.stream)
            value = job()
            done = torch.cuda.Event(enable_timing=self.timing)
            done.record(self.stream)
        self._in_flight.append(done)
        return Launched(value, done, time.perf_counter() - start_time,
                        (begin, done) if begin is not None else None)

    def consume(self, launched: Launched) -> Any:
        """Make the current stream wait for the job and own its tensors from now on."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(launched.done)
        for tensor in _tensors(launched.value):
            tensor.record_stream(current)
        return launched.value

    def before_optimizer_step(self) -> None:
        current = torch.cuda.current_stream(self.device)
        for event in self._in_flight:
            current.wait_event(event)
        self._in_flight.clear()

    def after_optimizer_step(self) -> None:
        self._weights_ready = torch.cuda.Event()
        self._weights_ready.record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        self.stream.synchronize()


def build_executor(kind: str, device: torch.device) -> SequentialExecutor | CudaStreamExecutor:
    """kind: auto (stream on CUDA, sequential on CPU), stream, or sequential."""
    if kind == "stream" or (kind == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ConfigError("adv.executor=stream needs a CUDA device; use adv.executor=auto")
        return CudaStreamExecutor(device)
    return SequentialExecutor()
