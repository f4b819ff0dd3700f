"""Writing checkpoints: atomic, verifiable, in the background; and choosing the one to resume.
The format itself (layout, manifest, checks, reading) is conadv/checkpoints/format.py.

A checkpoint is written into step-N.partial/ and renamed only once every file and the manifest
are on disk (fsync'd), so a crash mid-write never leaves something that looks complete; the
manifest lets resume detect truncated or corrupt files and fall back.

Saving does not stall training: the caller hands over a host copy of the state (`host_copy`),
and a background thread serialises, checksums, writes and renames it. A new save, the end of the
run and `wait()` wait for the previous write and re-raise its error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from conadv.checkpoints.format import (
    FORMAT,
    MANIFEST,
    STATE,
    list_checkpoints,
    names_its_step,
    other_format,
    problem,
    run_of,
)
from conadv.distributed import broadcast_object
from conadv.errors import CheckpointError, CheckpointWriteError
from conadv.fileio import file_sha256
from conadv.streams import streams_for, wait_for_current_stream
from conadv.train.nonfinite import first_non_finite

log = logging.getLogger(__name__)



def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _save_file(path: Path, obj: Any) -> None:
    """torch.save straight to the file (no in-memory copy of a possibly large state), fsync'd."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def host_copy(obj: Any) -> Any:
    """A copy of a nested state (dicts, lists, tuples, tensors) with every tensor in host memory,
    so training may go on changing the originals while the copy is written."""
    devices: set[torch.device] = set()
    copied = _copy_to_host(obj, devices)
    for device in devices:  # the non-blocking device-to-host copies (queued on the current
        streams = streams_for(device)  # stream) have landed; other streams may go on
        if streams is not None:
            wait_for_current_stream(streams)
    return copied


def _copy_to_host(obj: Any, devices: set[torch.device]) -> Any:
    if isinstance(obj, torch.Tensor):
        devices.add(obj.device)
        if obj.device.type == "cpu":
            return obj.detach().clone()
        return obj.detach().to("cpu", non_blocking=True)
    if isinstance(obj, dict):
        return {key: _copy_to_host(value, devices) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_to_host(value, devices) for value in obj)
    return obj


def _os_error_in(err: BaseException) -> OSError | None:
    """The OS error (no space, quota, permission, I/O) behind a failed write: torch.save wraps
    the file's OSError in a RuntimeError of its zip writer."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class CheckpointManager:
    """Saves (rank 0, in the background) and finds checkpoints under one directory."""

    def __init__(self, directory: Path, keep_last: int, is_main: bool = True,
                 run_id: str | None = None) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.is_main = is_main
        self.run_id = run_id  # written into every manifest; only this run's are pruned
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_write_seconds: float | None = None  # serialise, checksum, write, rename

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Start writing `state` (host tensors only: see `host_copy`) as the checkpoint of
        `step`; returns its final path. Waits for the previous write first."""
        self.wait()
        final = self.directory / f"step-{step:08d}"
        self._writer = threading.Thread(target=self._write_in_background,
                                        args=(final, {"format": FORMAT, "step": step, **state}),
                                        name="conadv-checkpoint", daemon=True)
        self._writer.start()
        return final

    def wait(self) -> None:
        """Block until the background write is on disk; re-raise its error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def agreed_wait(self) -> None:
        """A collective: rank 0 waits for its write and every rank raises its error, so all
        ranks stop together when a checkpoint could not be written."""
        message = None
        if self.is_main:
            try:
                self.wait()
            except (CheckpointWriteError, CheckpointError) as err:
                message = str(err)
        message = broadcast_object(message)
        if message:
            raise CheckpointWriteError(message)

    def _write_in_background(self, final: Path, state: dict[str, Any]) -> None:
        partial = final.with_name(final.name + ".partial")
        started = time.perf_counter()
        try:
            self._write(final, partial, state)
            self.last_write_seconds = time.perf_counter() - started
        except BaseException as err:  # re-raised in the training thread by wait()
            shutil.rmtree(partial, ignore_errors=True)
            os_error = _os_error_in(err)
            if os_error is None:
                self._error = err
                return
            log.debug("checkpoint write failed", exc_info=err)  # the traceback, for the log
            self._error = CheckpointWriteError(self._describe_failure(final, os_error))

    def _describe_failure(self, final: Path, err: OSError) -> str:
        try:
            free = f"{shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        intact = list_checkpoints(self.directory)
        newest = (f"the newest intact checkpoint is {intact[0]}" if intact
                  else "no intact checkpoint exists yet")
        return (f"cannot write checkpoint {final}: {err.strerror or err} ({free}); {newest}; "
                "free space or fix the directory, then resume with checkpoint.resume=auto")

    def remove_leftovers(self) -> None:
        """Delete what a crashed write left behind (step-N.partial/, *.tmp)."""
        if not (self.is_main and self.directory.is_dir()):
            return
        for leftover in self.directory.iterdir():
            if leftover.name.endswith(".partial") and leftover.is_dir():
                log.warning("removing %s, left by an interrupted checkpoint write", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover.name.endswith(".tmp"):
                leftover.unlink(missing_ok=True)

    def _write(self, final: Path, partial: Path, state: dict[str, Any]) -> None:
        bad = first_non_finite(state)
        if bad:  # the trainer checks first; this keeps a bad state off the disk regardless
            raise CheckpointError(f"refusing to write checkpoint {final}: {bad} holds NaN or "
                                  "infinite values")
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        _save_file(partial / STATE, state)
        size = (partial / STATE).stat().st_size
        manifest = {"format": FORMAT, "step": state["step"], "run_id": self.run_id,
                    "files": {STATE: {"bytes": size, "sha256": file_sha256(partial / STATE)}}}
        _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (e.g. end of a resumed run)
            if run_of(final) != self.run_id:
                raise CheckpointError(f"{final} belongs to another run; it is left as it is "
                                      "and this run's checkpoint was not written")
            if final.is_symlink():  # a link named after this step: the link goes, not its
                final.unlink()      # target
            else:
                shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.directory)
        self._prune()
        log.info("saved checkpoint %s", final)

    def _prune(self) -> None:
        """Keep this run's newest `keep_last` checkpoints; never touch another run's."""
        mine = [p for p in list_checkpoints(self.directory)  # a copy or link named after
                if run_of(p) == self.run_id and not p.is_symlink() and names_its_step(p)]
        for old in mine[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def choose_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `none`, an explicit path, or `auto` (the newest
        valid one, falling back to older ones with a log line; when every checkpoint is
        damaged the run stops rather than silently start over). Rank 0's decision: see
        `conadv.train.run_directory.claim`, which tells the other ranks."""
        if resume == "none":
            return None
        if resume != "auto":
            why = problem(Path(resume))
            if why:
                raise CheckpointError(f"checkpoint {resume} cannot be used: {why}")
            return Path(resume)
        damaged = []
        for candidate in list_checkpoints(self.directory):
            other = other_format(candidate)
            if other:  # another version's run: never start it over silently
                raise CheckpointError(f"checkpoint {candidate} cannot be used: {other}; resume "
                                      "it with that version, or start afresh with a new "
                                      "log.run_dir (or checkpoint.resume=none "
                                      "log.overwrite=true to replace it)")
            why = problem(candidate)
            if why is None:
                return candidate
            log.warning("skipping checkpoint %s: %s; trying the previous one", candidate, why)
            damaged.append(f"{candidate.name}: {why}")
        if damaged:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged ({'; '.join(damaged[:3])}); "
                "nothing was overwritten: repair one and resume it with "
                "checkpoint.resume=PATH, or start afresh with checkpoint.resume=none "
                "log.overwrite=true")
        return None


