"""Atomic, verifiable checkpoints with per-rank state, and resume that skips broken ones.

Layout: <dir>/step-00000100/ holds shared.pt (rank 0: model, optimizer, scaler, scheduler, step),
rank-00000.pt ... (each rank: data position, RNG states, engine queue) and manifest.json (size
and SHA-256 of every file). A checkpoint is written into step-N.partial/ and renamed only once
every file and the manifest are on disk (fsync'd), so a crash mid-write never leaves something
that looks complete; the manifest lets resume detect truncated or corrupt files and fall back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conadv.distributed import all_gather_object, barrier, broadcast_object
from conadv.errors import CheckpointError

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
SHARED = "shared.pt"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


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


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints under one directory for a job of `world_size` ranks."""

    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    # ------------------------------------------------------------------ saving
    def save(self, step: int, shared: dict[str, Any] | None, per_rank: dict[str, Any]) -> Path:
        """Collective: every rank calls it; `shared` is only used on rank 0."""
        final = self.directory / f"step-{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        barrier()
        data = _serialize(per_rank)
        _write_atomic(partial / rank_file(self.rank), data)
        digests = [(rank_file(self.rank), len(data), _sha256(data))]
        if self.rank == 0:
            blob = _serialize(shared)
            _write_atomic(partial / SHARED, blob)
            digests.append((SHARED, len(blob), _sha256(blob)))
        all_digests = self._gather(digests)
        if self.rank == 0:
            manifest = {"step": step, "world_size": self.world_size,
                        "files": {name: {"bytes": size, "sha256": digest}
                                  for name, size, digest in all_digests}}
            _write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1).encode())
            _fsync_dir(partial)
            if final.exists():  # the same step saved again (e.g. end of a resumed run)
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.directory)
            self._prune()
            log.info("saved checkpoint %s", final)
        barrier()
        return final

    @staticmethod
    def _gather(digests: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
        return [item for rank_items in all_gather_object(digests) for item in rank_items]

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

    def problem(self, path: Path) -> str | None:
        """Why this checkpoint cannot be used, or None when every file matches its manifest."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            return f"its manifest is missing or unreadable ({err})"
        if manifest.get("world_size") != self.world_size:
            return (f"it was written by {manifest.get('world_size')} ranks and this job has "
                    f"{self.world_size} (per-rank data position and RNG cannot be mapped)")
        for name, meta in manifest["files"].items():
            file = path / name
            if not file.is_file() or file.stat().st_size != meta["bytes"]:
                return f"{name} is missing or truncated"
            if _sha256(file.read_bytes()) != meta["sha256"]:
                return f"{name} is corrupt (checksum mismatch)"
        return None

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `none`, an explicit path, or `auto` (newest valid,
        falling back to older ones with a log line). Rank 0 decides for everyone."""
        if resume == "none":
            return None
        chosen: str | None = None
        error: str | None = None
        if self.rank == 0:
            if resume == "auto":
                for candidate in self.list_checkpoints():
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

    def load(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """(shared state, this rank's state), on the CPU."""
        shared = torch.load(path / SHARED, map_location="cpu", weights_only=False)
        mine = torch.load(path / rank_file(self.rank), map_location="cpu", weights_only=False)
        return shared, mine


def load_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state_dict stored in a checkpoint directory."""
    if not (path / SHARED).is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no {SHARED})")
    return torch.load(path / SHARED, map_location="cpu", weights_only=False)["model"]
