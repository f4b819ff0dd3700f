"""CUDA's stream-ordering rules, checked on the CPU.

The CPU runs every "stream" in program order, so a missing event or wait never shows as a wrong
number there. `OrderChecker` is a stand-in for a device's streams (installed for the CPU with
`conadv.streams.stand_in`): it runs everything in program order too, but keeps a vector clock
per stream and, through a TorchDispatchMode, attributes every aten op to the current stream and
checks every storage it touches:

- a read of a storage last written by another stream needs an edge (an event recorded after the
  write and waited for, `wait_stream`, or a host synchronisation) from that write;
- a write of a storage another stream read or wrote needs an edge from those accesses;
- when a storage dies, every other stream that used it must be ordered before the stream that
  allocated it (which the caching allocator lets reuse the memory at once), unless the user
  marked the tensor with `keep_alive` (CUDA's record_stream) for that stream.

Host work is not on a stream: what runs inside `host()` (the data loader), and ops whose
tensor inputs are all host tensors outside an explicit stream, make host tensors, which any
stream may read (on a GPU they are pinned host memory copied in program order). A tensor the
checker never saw made (torch.tensor, torch.load) counts as host memory inside `host()` and as
device memory elsewhere. A `.to(device)`
is a no-op on the CPU, so a host batch stays a host tensor where a GPU run would copy it.

Asynchronous collectives (`isend`, `irecv`, and any collective called with `async_op=True`)
run on a stream of their own, as NCCL's do: it starts after what the calling stream queued,
touches the collective's tensors, and is joined by `work.wait()` (the current stream only, as
on NCCL; the host as well when every tensor is host memory, as gloo's CPU path does) or by a
`work.is_completed()` that returned True (the host). Synchronous collectives and the ones DDP
waits for inside C++ are charged to the calling stream, which they block on a GPU too.

DALI's pipeline writes its outputs on a stream of its own into buffers that its next run
reuses: `run()` returns once they are written (the host knows it), and the next `run()` may
overwrite them only after every stream that read them (the loader's copy out) is known done.

Pinned host memory (`DeviceStreams.pin`) is host memory that streams copy to and from without
the host waiting: a stream that writes it (a `non_blocking` device-to-host copy) must be known
finished by the host (an event synchronised, `synchronize()`) before the host reads it, and a
stream that reads it (a `non_blocking` host-to-device copy, `.to(device)` of a pinned tensor)
must be known finished before the host writes it again.

`no_host_sync()` also records every read of a device value by the host (item, bool, tolist,
numpy, cpu, `.to("cpu")`, printing, nonzero, equal...), the CPU's stand-in for
torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import inspect
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import conadv

HOST = -1

# aten ops that make the host wait for a device value
_HOST_READS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select",
               "unique_dim", "_unique2", "unique_consecutive", "nonzero_static"}


class StreamOrderError(AssertionError):
    """A cross-stream access without the event or wait that would order it on a GPU."""


# Matched by directory, not by name: a virtualenv kept under ~/.cache/conadv/ holds torch too.
_PROJECT_DIRS = (str(Path(conadv.__file__).parent) + "/", str(Path(__file__).parent) + "/")


def _where() -> str:
    """The innermost project frame (conadv/ or tests/) that led here."""
    frames = [f for f in traceback.extract_stack()[:-2]
              if f.filename.startswith(_PROJECT_DIRS) and f.filename != __file__]
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:" \
           f"{frame.lineno} ({frame.line})"


class SimStream:
    def __init__(self, checker: OrderChecker, name: str) -> None:
        self.checker = checker
        self.name = name
        self.id = len(checker.streams)
        checker.streams.append(self)
        self.clock: dict[int, int] = {self.id: 1}

    def position(self) -> int:
        return self.clock[self.id]

    def covers(self, stream: int, position: int) -> bool:
        """Everything this stream does from now on happens after `position` on `stream`."""
        seen = max(self.clock.get(stream, 0), self.checker.host_clock.get(stream, 0))
        return seen > position

    def merge(self, clock: dict[int, int]) -> None:
        for stream, position in clock.items():
            if position > self.clock.get(stream, 0):
                self.clock[stream] = position

    def wait_event(self, event: SimEvent) -> None:
        if event.clock is not None:  # waiting for an event never recorded: no-op, as CUDA
            self.merge(event.clock)

    def wait_stream(self, stream: SimStream) -> None:
        self.merge(stream.clock)

    def synchronize(self) -> None:
        self.checker.host_learns(self.clock)

    def __repr__(self) -> str:
        return f"stream '{self.name}'"


class SimEvent:
    def __init__(self, checker: OrderChecker) -> None:
        self.checker = checker
        self.clock: dict[int, int] | None = None

    def record(self, stream: SimStream | None = None) -> None:
        stream = stream or self.checker.current()
        self.clock = dict(stream.clock)

    def wait(self, stream: SimStream | None = None) -> None:
        (stream or self.checker.current()).wait_event(self)

    def query(self) -> bool:
        """Done (the CPU ran it); a caller that acts on it learned what the event covers."""
        if self.clock is not None:
            self.checker.host_learns(self.clock)
        return True

    def synchronize(self) -> None:
        if self.clock is not None:
            self.checker.host_learns(self.clock)

    def elapsed_time(self, other: SimEvent) -> float:
        return 0.0


@dataclass
class _Storage:
    description: str
    allocator: int  # the stream that allocated it, or HOST
    write: tuple[int, int] | None = None  # (stream, position) of the last write
    reads: dict[int, int] = field(default_factory=dict)  # stream -> position of its last read
    kept: set[int] = field(default_factory=set)  # streams it was keep_alive'd for
    # host memory a collective writes in the background: (its stream, position)
    collective: tuple[int, int] | None = None


class OrderChecker(TorchDispatchMode):
    """The stand-in streams of the CPU device, and the checks (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[SimStream] = []
        self.host_clock: dict[int, int] = {}
        self.main = SimStream(self, "main")
        self._local = threading.local()
        self._storages: dict[int, _Storage] = {}
        self.violations: list[str] = []
        self.host_reads: list[str] = []  # host reads of device values inside no_host_sync()
        self._watching_host_reads = 0
        self.marks: dict[str, int] = {}  # counters a test keeps (e.g. steps), for messages
        self._pinned: set[int] = set()  # storages of pinned host memory
        # id(Work) -> (the work, its stream, whether all its tensors are host memory)
        self._works: dict[int, tuple[Any, SimStream, bool]] = {}
        # id(DALI pipeline) -> (its stream, the record of its reused output buffers, pipeline)
        self._dali: dict[int, tuple[SimStream, _Storage, Any]] = {}

    # the DeviceStreams interface ----------------------------------------------------------
    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current(self) -> SimStream:
        stack = self._stack()
        explicit = [s for s in stack if s is not HOST]
        return explicit[-1] if explicit else self.main

    def new_stream(self) -> SimStream:
        return SimStream(self, f"side{len(self.streams)}")

    @contextmanager
    def use(self, stream: SimStream) -> Iterator[None]:
        self._stack().append(stream)
        try:
            yield
        finally:
            self._stack().pop()

    def new_event(self, timing: bool = False) -> SimEvent:
        return SimEvent(self)

    def keep_alive(self, tensor: torch.Tensor, stream: SimStream) -> None:
        record = self._storages.get(self._key(tensor))
        if record is not None:
            record.kept.add(stream.id)

    def synchronize(self) -> None:
        for stream in self.streams:
            self.host_learns(stream.clock)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """A pinned host copy: host memory whose stream copies the checker orders."""
        with self.host():
            pinned = tensor.clone()
        key = self._key(pinned)
        self._pinned.add(key)
        weakref.finalize(pinned.untyped_storage(), self._pinned.discard, key)
        return pinned

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        try:
            return self._key(tensor) in self._pinned
        except (RuntimeError, NotImplementedError):
            return False

    # asynchronous collectives -------------------------------------------------------------
    @contextmanager
    def collective(self) -> Iterator[None]:
        """A Python-level asynchronous collective: its c10d op runs on a stream of its own."""
        self._local.collective = getattr(self._local, "collective", 0) + 1
        try:
            yield
        finally:
            self._local.collective -= 1

    def _run_collective(self, func, args, kwargs, inputs, written):
        """The c10d op on a new stream that starts after the calling stream's work; the
        returned Work is registered so that wait()/is_completed() join that stream."""
        from torch._C._distributed_c10d import Work

        caller = self.current()
        work_stream = SimStream(self, f"{func.__name__.split('.')[0]} work")
        work_stream.merge(caller.clock)
        work_stream.merge(self.host_clock)
        position = work_stream.position()
        host_only = not any(self._is_device(t) for t in inputs)
        for tensor in inputs:
            if host_only:  # gloo on a GPU run: the host's memory, written in the background
                record = self._record_of(tensor, HOST)
                if any(tensor is w for w in written):
                    record.collective = (work_stream.id, position)
            else:
                self._access(tensor, work_stream, position, any(tensor is w for w in written))
                # c10d keeps its tensors alive until the work is done (record_stream)
                self._record_of(tensor, work_stream.id).kept.add(work_stream.id)
        out = func(*args, **kwargs)
        work_stream.clock[work_stream.id] += 1
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.ScriptObject):
                work = Work.unbox(item)
                self._works[id(work)] = (work, work_stream, host_only)
        return out

    def joined(self, work: Any, completed: bool) -> None:
        """`work.wait()` returned (completed=False) or `work.is_completed()` said True."""
        entry = self._works.get(id(work))
        if entry is None or entry[0] is not work:
            return
        _, work_stream, host_only = entry
        if completed or host_only:
            self.host_learns(work_stream.clock)
        if not completed:
            self.current().merge(work_stream.clock)

    # DALI --------------------------------------------------------------------------------
    def dali_run(self, pipe: Any) -> None:
        """A pipeline run overwrites its output buffers on DALI's stream, which starts after
        what the host knows; the run returns once they are written."""
        if id(pipe) not in self._dali:
            self._dali[id(pipe)] = (SimStream(self, "DALI"), _Storage("DALI output", HOST), pipe)
        stream, record, _ = self._dali[id(pipe)]
        stream.merge(self.host_clock)
        position = stream.position()
        for reader, at in record.reads.items():
            if reader != stream.id and not stream.covers(reader, at):
                self._violation(f"DALI's next run overwrites the output buffers that "
                                f"{self.streams[reader]} may still be reading (synchronise an "
                                "event recorded after that read before running the pipeline)")
        record.write, record.reads = (stream.id, position), {}
        stream.clock[stream.id] += 1
        self.host_learns(stream.clock)

    def dali_output(self, pipe: Any, tensor: torch.Tensor) -> None:
        """`tensor` views the output buffers of the pipeline's last run."""
        key = self._key(tensor)
        self._storages[key] = self._dali[id(pipe)][1]
        weakref.finalize(tensor.untyped_storage(), self._storages.pop, key, None)

    # test-side controls -----------------------------------------------------------------
    @contextmanager
    def host(self) -> Iterator[None]:
        """Work the host does (the data loader): its tensors are host memory."""
        self._stack().append(HOST)
        try:
            yield
        finally:
            self._stack().pop()

    def host_work(self, function: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            with self.host():
                return function(*args, **kwargs)
        return wrapped

    @contextmanager
    def host_data(self) -> Iterator[None]:
        """The data pipeline is host work: building the trainer's loaders (their transforms'
        tensors live in host memory on a GPU run) and drawing batches from them."""
        from conadv.data.loader import BatchStream
        from conadv.train import eval_job, parts, trainer

        patched = [(BatchStream, "next"), (parts, "build_train_stream"),
                   (trainer, "build_eval_loader"), (eval_job, "build_eval_loader")]
        originals = [getattr(owner, name) for owner, name in patched]
        for (owner, name), original in zip(patched, originals):
            setattr(owner, name, self.host_work(original))
        try:
            yield
        finally:
            for (owner, name), original in zip(patched, originals):
                setattr(owner, name, original)

    @contextmanager
    def no_host_sync(self) -> Iterator[None]:
        self._watching_host_reads += 1
        try:
            yield
        finally:
            self._watching_host_reads -= 1

    def host_learns(self, clock: dict[int, int]) -> None:
        for stream, position in clock.items():
            if position > self.host_clock.get(stream, 0):
                self.host_clock[stream] = position

    def check(self) -> None:
        """Raise the first ordering violation seen (frees are found outside any op)."""
        if self.violations:
            first, more = self.violations[0], len(self.violations) - 1
            raise StreamOrderError(first + (f" (and {more} more)" if more else ""))

    # bookkeeping --------------------------------------------------------------------------
    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        return id(tensor.untyped_storage())

    def _in_host_mode(self) -> bool:
        stack = self._stack()
        return bool(stack) and stack[-1] is HOST

    def _record_of(self, tensor: torch.Tensor, allocator: int) -> _Storage:
        storage = tensor.untyped_storage()
        key = id(storage)
        record = self._storages.get(key)
        if record is None:
            record = _Storage(_describe(tensor), allocator)
            self._storages[key] = record
            weakref.finalize(storage, self._freed, key)
        return record

    def _is_device(self, tensor: torch.Tensor) -> bool:
        """Written on a stream, or made outside host work (torch.tensor(..., device=...) makes
        no aten op this checker sees)."""
        try:
            record = self._storages.get(self._key(tensor))
        except (RuntimeError, NotImplementedError):  # no storage (meta, sparse...)
            return False
        if record is None:
            return not self._in_host_mode()
        if record.allocator == HOST and self._key(tensor) in self._pinned:
            return False  # pinned host memory, whichever stream copied into it
        return record.allocator != HOST or record.write is not None

    def _violation(self, message: str) -> None:
        self.violations.append(f"{message} at {_where()}")

    def _freed(self, key: int) -> None:
        record = self._storages.pop(key, None)
        if record is None or record.allocator == HOST:
            return
        owner = self.streams[record.allocator]
        users = dict(record.reads)
        if record.write is not None:
            stream, position = record.write
            users[stream] = max(users.get(stream, 0), position)
        for stream, position in users.items():
            if stream in (record.allocator, HOST) or stream in record.kept:
                continue
            if not owner.covers(stream, position):
                self._violation(
                    f"a {record.description} tensor allocated on {owner} and used on "
                    f"{self.streams[stream]} was freed without keep_alive (record_stream) for "
                    f"that stream or a wait: its memory may be reused while still in use")

    # the dispatch hook --------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        written = _written_arguments(func, args, kwargs)
        if self._watching_host_reads and name in _HOST_READS and any(
                self._is_device(t) for t in inputs):
            self.host_reads.append(f"{name} {self.marks} at {_where()}")

        if func.namespace == "c10d" and getattr(self._local, "collective", 0):
            return self._run_collective(func, args, kwargs, inputs, written)
        explicit = [s for s in self._stack() if s is not HOST]
        host_mode = self._in_host_mode()
        device_copy = getattr(self._local, "device_copy", False)
        on_host = not device_copy and (host_mode or (not explicit and inputs and not any(
            self._is_device(t) for t in inputs)))
        stream = None if on_host else self.current()
        if stream is None:
            for tensor in inputs:
                record = self._storages.get(self._key(tensor))
                if record is not None and (self.is_pinned(tensor) or record.collective):
                    self._check_host_access(tensor, record, any(tensor is w for w in written))
        if stream is not None:
            stream.merge(self.host_clock)  # enqueued after everything the host waited for
            position = stream.position()
            for tensor in inputs:
                self._access(tensor, stream, position, write=any(
                    tensor is w for w in written))
        out = func(*args, **kwargs)
        allocator = HOST if stream is None else stream.id
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and self._key(tensor) not in self._storages:
                record = self._record_of(tensor, allocator)
                if stream is not None:
                    record.write = (stream.id, position)
        if stream is not None:
            stream.clock[stream.id] += 1
        return out

    def _check_host_access(self, tensor: torch.Tensor, record: _Storage, write: bool) -> None:
        """The host touches host memory (pinned, or a gloo collective's): the streams that
        copy it must be known done."""
        what = record.description  # the buffer, not the view of it that the op touches
        for writer, at in (w for w in (record.write, record.collective) if w is not None):
            if self.host_clock.get(writer, 0) <= at:
                verb = "overwrites" if write else "reads"
                self._violation(f"the host {verb} a pinned {what} buffer that "
                                f"{self.streams[writer]} may still be writing (a non_blocking "
                                "copy or a collective: synchronise an event recorded after it)")
        if write:
            for reader, at in record.reads.items():
                if reader != HOST and self.host_clock.get(reader, 0) <= at:
                    self._violation(f"the host overwrites a pinned {what} buffer that "
                                    f"{self.streams[reader]} may still be copying from (a "
                                    "non_blocking copy: synchronise an event recorded after it)")
            record.write, record.reads, record.collective = None, {}, None

    def _access(self, tensor: torch.Tensor, stream: SimStream, position: int,
                write: bool) -> None:
        record = self._record_of(tensor, stream.id)  # first seen as an input: made before
        what = _describe(tensor)
        if record.write is not None:
            writer, at = record.write
            if writer != stream.id and not stream.covers(writer, at):
                verb = "overwrites" if write else "reads"
                self._violation(f"{stream} {verb} a {what} tensor written on "
                                f"{self.streams[writer]} without waiting for that write")
        if write:
            for reader, at in record.reads.items():
                if reader != stream.id and not stream.covers(reader, at):
                    self._violation(f"{stream} overwrites a {what} tensor that "
                                    f"{self.streams[reader]} may still be reading")
            record.write = (stream.id, position)
            record.reads = {}
        else:
            record.reads[stream.id] = position


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _written_arguments(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes in place (schema arguments marked `(a!)`; c10d's schemas mark
    none, its in-place ops (allreduce_, broadcast_, recv_, allgather_...) write their first)."""
    if func.namespace == "c10d":
        first = tree_flatten(args[:1])[0] if func.__name__.split(".")[0].endswith("_") else []
        return [t for t in first if isinstance(t, torch.Tensor)]
    written: list[torch.Tensor] = []
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        written.extend(v for v in values if isinstance(v, torch.Tensor))
    return written


_METHODS_THAT_READ_ON_THE_HOST = ("tolist", "numpy", "cpu", "__repr__", "__format__")


@contextmanager
def checked_streams(watch_host_reads: bool = True) -> Iterator[OrderChecker]:
    """Install the checker as the CPU's streams and its dispatch mode; raise the first
    violation at the end. With `watch_host_reads`, the Tensor methods that read a value on the
    host without an aten op (tolist, numpy, cpu, `.to("cpu")`, printing) are recorded too
    while a `no_host_sync()` window is open."""
    from conadv.streams import stand_in

    checker = OrderChecker()
    originals: dict[str, Any] = {}
    methods = (*_METHODS_THAT_READ_ON_THE_HOST, "to") if watch_host_reads else ("to",)
    for method in methods:
        originals[method] = getattr(torch.Tensor, method)
        setattr(torch.Tensor, method, _watched(checker, method, originals[method]))
    try:
        with stand_in(checker), _collectives_watched(checker), _dali_watched(checker), checker:
            yield checker
    finally:
        for method, original in originals.items():
            setattr(torch.Tensor, method, original)
    checker.check()


@contextmanager
def _dali_watched(checker: OrderChecker) -> Iterator[None]:
    """Pipeline runs and the tensors taken out of their outputs (torch.from_dlpack)."""
    try:
        from nvidia.dali.pipeline import Pipeline
    except ImportError:
        yield
        return
    original_run, original_from_dlpack = Pipeline.run, torch.from_dlpack

    def run(self, *args, **kwargs):
        checker.dali_run(self)
        outputs = original_run(self, *args, **kwargs)
        checker._local.dali_pipe = self
        return outputs

    def from_dlpack(source, *args, **kwargs):
        tensor = original_from_dlpack(source, *args, **kwargs)
        pipe = getattr(checker._local, "dali_pipe", None)
        if pipe is not None and type(source).__module__.startswith("nvidia.dali"):
            checker.dali_output(pipe, tensor)
        return tensor

    Pipeline.run, torch.from_dlpack = run, from_dlpack
    try:
        yield
    finally:
        Pipeline.run, torch.from_dlpack = original_run, original_from_dlpack


# the Python-level collectives that hand their Work back (isend/irecv always, the rest with
# async_op=True); their c10d ops run on a stream of their own
_ASYNC_COLLECTIVES = ("isend", "irecv", "broadcast", "all_reduce", "all_gather",
                      "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


@contextmanager
def _collectives_watched(checker: OrderChecker) -> Iterator[None]:
    import torch.distributed as dist
    from torch._C._distributed_c10d import Work
    from torch.distributed import distributed_c10d

    patched: list[tuple[Any, str, Any]] = []

    def collective(original: Callable, always_async: bool) -> Callable:
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            asynchronous = always_async or signature.bind(*args, **kwargs).arguments.get(
                "async_op", False)
            if not asynchronous:
                return original(*args, **kwargs)
            with checker.collective():
                return original(*args, **kwargs)
        return wrapper

    def wait(self, *args, **kwargs):
        result = original_wait(self, *args, **kwargs)
        checker.joined(self, completed=False)
        return result

    def is_completed(self):
        done = original_is_completed(self)
        if done:
            checker.joined(self, completed=True)
        return done

    for name in _ASYNC_COLLECTIVES:
        original = getattr(distributed_c10d, name)
        wrapped = collective(original, name in ("isend", "irecv"))
        for owner in (dist, distributed_c10d):
            patched.append((owner, name, getattr(owner, name)))
            setattr(owner, name, wrapped)
    original_wait, original_is_completed = Work.wait, Work.is_completed
    patched += [(Work, "wait", original_wait), (Work, "is_completed", original_is_completed)]
    Work.wait, Work.is_completed = wait, is_completed
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def _moves_to_a_device(args: tuple, kwargs: dict) -> bool:
    """`.to(...)` names a device (on the CPU stand-in a pinned tensor's only destination)."""
    return any(isinstance(a, torch.device) or (isinstance(a, str) and a != "cpu")
               for a in (*args, kwargs.get("device")))


def _watched(checker: OrderChecker, method: str, original: Callable) -> Callable:
    def wrapper(self, *args, **kwargs):
        if method == "to" and checker.is_pinned(self) and _moves_to_a_device(args, kwargs):
            # a host-to-device copy (a no-op on the CPU): a copy on the current stream
            checker._local.device_copy = True
            try:
                return original(self, *args, **{**kwargs, "copy": True})
            finally:
                checker._local.device_copy = False
        if method not in _METHODS_THAT_READ_ON_THE_HOST and method != "to":
            return original(self, *args, **kwargs)
        if checker._watching_host_reads and checker._is_device(self):
            to_host = method != "to" or any(
                isinstance(a, str) and a == "cpu" for a in (*args, kwargs.get("device")))
            if to_host:
                checker.host_reads.append(f"Tensor.{method} {checker.marks} at {_where()}")
        return original(self, *args, **kwargs)
    return wrapper
