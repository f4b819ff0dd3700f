"""Device streams and events behind one small interface, so that code which overlaps work (the
ConAdv executor's side stream, the DALI loader's copy stream, whoever consumes a tensor made on
another stream) states its ordering once and the same lines run on a GPU and under test.

`streams_for(device)` gives CUDA's streams for a CUDA device and None for the CPU, where
everything runs in program order. Tests install a stand-in for the CPU (`stand_in`) that runs
everything in program order too, but checks every tensor access against the events and waits
that order it, and every host read of a device value (tests/stream_order.py): the CPU suite
then sees CUDA's ordering rules instead of serialising them away.

The rules the code follows (and the stand-in checks):
- a tensor written on one stream is read on another only after the reader waited for an event
  recorded after the write (`wait_event`, or `wait_stream` on the writer's stream);
- a tensor a stream may still read is not written by another stream until that one waited
  for an event recorded after the read;
- a tensor used by a stream other than the one that allocated it is marked with `keep_alive`
  (CUDA's record_stream) by the user, so its memory is not handed out again while still used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import torch


class DeviceStreams(Protocol):
    """What the project needs of a device's streams. Stream objects have `wait_event(event)`,
    `wait_stream(stream)` and `synchronize()`; events have `record(stream)`, `query()`,
    `synchronize()` and `elapsed_time(other)` (timing events), as torch.cuda's do."""

    def current(self) -> Any: ...

    def new_stream(self) -> Any: ...

    def use(self, stream: Any) -> AbstractContextManager: ...

    def new_event(self, timing: bool = False) -> Any: ...

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None: ...

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of a host tensor in pinned memory, which streams copy to and from without
        the host waiting (so the host must know a copy is done before it touches the
        buffer)."""
        ...

    def synchronize(self) -> None: ...


def wait_for_current_stream(streams: DeviceStreams) -> None:
    """Block the host until the current stream's work so far is done, and no other stream's
    (a device-wide synchronize would also wait for a side stream's attack or a receive)."""
    done = streams.new_event()
    done.record(streams.current())
    done.synchronize()


class CudaStreams:
    """torch.cuda's streams and events of one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(device=self.device)

    def use(self, stream: torch.cuda.Stream) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def new_event(self, timing: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=timing)

    def keep_alive(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        if tensor.is_cuda:
            tensor.record_stream(stream)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


_stand_in: DeviceStreams | None = None


def streams_for(device: torch.device) -> DeviceStreams | None:
    """The streams of `device`; None where work runs in program order (the CPU), unless a test
    installed a stand-in that checks the ordering."""
    if device.type == "cuda":
        return CudaStreams(device)
    return _stand_in


@contextmanager
def stand_in(streams: DeviceStreams) -> Iterator[DeviceStreams]:
    """Give the CPU these streams while the block runs (the tests' ordering checker)."""
    global _stand_in
    previous, _stand_in = _stand_in, streams
    try:
        yield streams
    finally:
        _stand_in = previous
