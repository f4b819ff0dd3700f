"""Atomic, verifiable checkpoints written in the background, and resume that skips broken ones.

Layout: <dir>/step-00000100/ holds state.pt (the whole run state, written by rank 0: every
part of a run's state is global, so no rank writes a file of its own) and manifest.json (size
and SHA-256 of every file). A checkpoint is written into step-N.partial/ and renamed only once
every file and the manifest are on disk (fsync'd), so a crash mid-write never leaves something
that looks complete; the manifest lets resume detect truncated or corrupt files and fall back.

Saving does not stall training: the caller hands over a host copy of the state (`host_copy`),
and a background thread serialises, checksums, writes and renames it. A new save, the end of the
run and `wait()` wait for the previous write and re-raise its error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from conadv.distributed import broadcast_object
from conadv.errors import CheckpointError, CheckpointWriteError
from conadv.fileio import file_sha256
from conadv.train.nonfinite import first_non_finite

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
STATE = "state.pt"
FORMAT = 2  # 1: per-rank files with image queues (conadv 0.1), not resumable


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
    copied = _copy_to_host(obj)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
    return copied


def _copy_to_host(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        return obj.detach().to("cpu", non_blocking=True)
    if isinstance(obj, dict):
        return {key: _copy_to_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_to_host(value) for value in obj)
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

    def __init__(self, directory: Path, keep_last: int, is_main: bool = True) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.is_main = is_main
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

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
        try:
            self._write(final, partial, state)
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
        intact = self.list_checkpoints()
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
        manifest = {"format": FORMAT, "step": state["step"],
                    "files": {STATE: {"bytes": size, "sha256": file_sha256(partial / STATE)}}}
        _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (e.g. end of a resumed run)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.directory)
        self._prune()
        log.info("saved checkpoint %s", final)

    def _prune(self) -> None:
        for old in self.list_checkpoints()[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ finding
    def list_checkpoints(self) -> list[Path]:
        """Complete-looking checkpoint directories, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    @staticmethod
    def other_format(path: Path) -> str | None:
        """Why a checkpoint written by another conadv version cannot be read, or None."""
        try:
            found = json.loads((path / MANIFEST).read_text()).get("format", 1)
        except (OSError, ValueError):
            return None  # not a format question: `problem` reports it
        if found == FORMAT:
            return None
        return (f"it has checkpoint format {found}, written by another conadv version; this "
                f"version reads format {FORMAT}")

    def problem(self, path: Path) -> str | None:
        """Why this checkpoint cannot be used, or None when every file matches its manifest."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            return f"its manifest is missing or unreadable ({err})"
        other = self.other_format(path)
        if other:
            return other
        for name, meta in manifest["files"].items():
            file = path / name
            if not file.is_file() or file.stat().st_size != meta["bytes"]:
                return f"{name} is missing or truncated"
            if file_sha256(file) != meta["sha256"]:
                return f"{name} is corrupt (checksum mismatch)"
        return None

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `none`, an explicit path, or `auto` (newest valid,
        falling back to older ones with a log line). Rank 0 decides for everyone."""
        if resume == "none":
            return None
        chosen: str | None = None
        error: str | None = None
        if self.is_main:
            if resume == "auto":
                for candidate in self.list_checkpoints():
                    other = self.other_format(candidate)
                    if other:  # another version's run: never start it over silently
                        error = (f"checkpoint {candidate} cannot be used: {other}; resume it "
                                 "with that version, or start afresh with a new log.run_dir "
                                 "or checkpoint.resume=none")
                        break
                    why = self.problem(candidate)
                    if why is None:
                        chosen = str(candidate)
                        break
                    log.warning("skipping checkpoint %s: %s; trying the previous one",
                                candidate, why)
            else:
                why = self.problem(Path(resume))
                if why is None:
                    chosen = resume
                else:
                    error = f"checkpoint {resume} cannot be used: {why}"
        chosen, error = broadcast_object((chosen, error))
        if error:
            raise CheckpointError(error)
        return Path(chosen) if chosen else None


def load_state(path: Path) -> dict[str, Any]:
    """The run state stored in a checkpoint directory, on the CPU."""
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no {STATE})")
    return torch.load(path / STATE, map_location="cpu", weights_only=False)


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state_dict stored in a checkpoint directory."""
    return load_state(path)["model"]


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory whose newest intact checkpoint is taken."""
    if (path / STATE).is_file():
        why = CheckpointManager(path.parent, keep_last=1).problem(path)
        if why:
            raise CheckpointError(f"checkpoint {path} cannot be used: {why}")
        return path
    manager = CheckpointManager(path / "checkpoints", keep_last=1)
    for candidate in manager.list_checkpoints():
        if manager.problem(candidate) is None:
            return candidate
    raise CheckpointError(f"no checkpoint found at {path} (give a run or checkpoint "
                          "directory; damaged checkpoints are skipped)")
