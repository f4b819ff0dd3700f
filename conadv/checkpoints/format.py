"""What a checkpoint is, and reading it: the layout of a checkpoint directory, its manifest,
the checks that tell a complete checkpoint from a truncated, corrupt or foreign one, and
loading its state, once, for every rank. Below both the trainer (which writes checkpoints,
conadv/train/checkpoint.py) and whoever reads weights from one (conadv/checkpoints/weights.py:
`model.init_from`, distillation teachers, `conadv-eval`).

Layout: <dir>/step-00000100/ holds state.pt (the whole run state, written by rank 0: every
part of a run's state is global, so no rank writes a file of its own) and manifest.json
(format, step, the id of the run that wrote it, and the size and SHA-256 of every file).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from conadv.distributed import broadcast_object, broadcast_state, rank
from conadv.errors import CheckpointError, UserError, first_line
from conadv.fileio import file_sha256, is_count

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
STATE = "state.pt"
FORMAT = 2  # 1: per-rank files with image queues (conadv 0.1), not resumable


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete-looking checkpoint directories under `directory`, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def names_its_step(path: Path) -> bool:
    """Whether a step-N folder's manifest is for step N (a copy of, or a link to, another
    checkpoint is not)."""
    named = STEP_DIR.match(path.name)
    try:
        manifest = _manifest(path)
    except (OSError, ValueError):
        return False
    return bool(named) and isinstance(manifest, dict) and manifest.get("step") == int(
        named.group(1))


def _manifest(path: Path) -> Any:
    return json.loads((path / MANIFEST).read_text())


def run_of(path: Path) -> str | None:
    """The id of the run that wrote a checkpoint (None if unknown)."""
    try:
        manifest = _manifest(path)
    except (OSError, ValueError):
        return None
    return manifest.get("run_id") if isinstance(manifest, dict) else None


def other_format(path: Path) -> str | None:
    """Why a checkpoint written by another conadv version cannot be read, or None."""
    try:
        manifest = _manifest(path)
    except (OSError, ValueError):
        return None  # not a format question: `problem` reports it
    if not isinstance(manifest, dict):
        return None
    found = manifest.get("format", 1)
    if found == FORMAT:
        return None
    return (f"it has checkpoint format {found}, written by another conadv version; this "
            f"version reads format {FORMAT}")


def problem(path: Path) -> str | None:
    """Why this checkpoint cannot be used, or None when every file matches its manifest."""
    try:
        manifest = _manifest(path)
    except (OSError, ValueError) as err:
        return f"its manifest is missing or unreadable ({err})"
    other = other_format(path)
    if other:
        return other
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or STATE not in files or not all(
            isinstance(meta, dict) and {"bytes", "sha256"} <= meta.keys()
            and Path(name).name == name for name, meta in files.items())):
        return f"its manifest is malformed (no size and checksum of {STATE})"
    if STEP_DIR.match(path.name) and not names_its_step(path):
        return (f"its manifest is for step {manifest.get('step')!r:.40}, not the step its "
                "folder names: a copy of, or a link to, another checkpoint")
    for name, meta in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != meta["bytes"]:
            return f"{name} is missing or truncated"
        if name == STATE and not zipfile.is_zipfile(file):  # its end, read before its bytes
            # are hashed: a hole or garbage of a declared 8 GiB costs no 26 s of hashing
            return f"{name} is corrupt (it is not the archive torch.save writes)"
        if file_sha256(file) != meta["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def state_sha256(path: Path) -> str:
    """The SHA-256 of a verified checkpoint's state file (from its manifest)."""
    return _manifest(path)["files"][STATE]["sha256"]


def load_state(path: Path) -> dict[str, Any]:
    """The run state stored in a checkpoint directory, on the CPU. Loaded with
    `weights_only=True`: tensors, numbers, strings and containers, which is all a run state
    holds; a file that needs anything else (a pickled class, a function call) is refused
    before any of it runs, whatever its manifest says."""
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory (no {STATE})")
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a Python object of type {found.group(1)}" if found else "a Python object"
        raise CheckpointError(f"{path / STATE} holds {what}, which a conadv checkpoint never "
                              "does; it was not loaded (loading it could run code)") from None
    except Exception as err:  # noqa: BLE001 (a damaged pickle stream raises what it meets:
        # RuntimeError, EOFError, OSError, IndexError on an empty stack... found by the fuzzer)
        raise CheckpointError(f"{path / STATE} cannot be read as a checkpoint "
                              f"({type(err).__name__}: {first_line(err)})") from None
    why = _contents_problem(state)
    if why:
        raise CheckpointError(f"{path / STATE} does not hold a conadv run state: {why}")
    return state


def _contents_problem(state: Any) -> str | None:
    """What a safely loaded state lacks of what conadv writes, or None: every consumer (resume,
    model.init_from, conadv-eval) reads `model` as tensors by name, `config` as YAML text and
    `step` as a count, and each other part as a mapping. Whether the tensors fit a model is
    the loader's question (it knows the model)."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a mapping of parts"
    model = state.get("model")
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        return "its model is not a mapping of parameter names to tensors"
    if not isinstance(state.get("config"), str):
        return "it holds no run config (the YAML text conadv saves with every checkpoint)"
    if not is_count(state.get("step")):
        return f"its step is {state.get('step')!r:.40}, not a count of optimizer steps"
    odd = [name for name, part in state.items()
           if name not in ("model", "config", "step", "format") and not isinstance(part, dict)]
    if odd:
        return f"its {odd[0]!r:.40} part is a {type(state[odd[0]]).__name__}, not a mapping"
    return None


def load_state_everywhere(path: Path | None, device: torch.device) -> dict[str, Any]:
    """The run state of a checkpoint on every rank, read once: rank 0 reads state.pt and the
    others receive it (at 1,024 ranks, 1,024 reads of one large file on a shared filesystem
    would be the slowest part of a restart). Other ranks may pass None. A checkpoint rank 0
    refuses is refused on every rank, in the same sentence (none waits for a state that will
    not come)."""
    state, refusal = None, None
    if rank() == 0:
        try:
            state = load_state(path)
        except UserError as err:
            refusal = err
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise refusal
    return broadcast_state(state, device)


def resolve_checkpoint_everywhere(path: Path) -> Path:
    """`resolve_checkpoint` decided by rank 0 for every rank: ranks resolving "the newest
    checkpoint" each on its own could pick different ones while training writes another."""
    chosen, error = None, None
    if rank() == 0:
        try:
            chosen = str(resolve_checkpoint(path))
        except CheckpointError as err:
            error = str(err)
    chosen, error = broadcast_object((chosen, error))
    if error:
        raise CheckpointError(error)
    return Path(chosen)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a run directory whose newest intact checkpoint is taken."""
    if (path / STATE).is_file():
        why = problem(path)
        if why:
            raise CheckpointError(f"checkpoint {path} cannot be used: {why}")
        return path
    for candidate in list_checkpoints(path / "checkpoints"):
        if problem(candidate) is None:
            return candidate
    raise CheckpointError(f"no checkpoint found at {path} (give a run or checkpoint "
                          "directory; damaged checkpoints are skipped)")
