"""File helpers shared by checkpoints and packed shards."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file, streamed in chunks (hashlib releases the GIL, so a background
    checkpoint writer lets training run meanwhile)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_count(value: Any) -> bool:
    """Whether a value read back from a file (a checkpoint, a shard index) is a count: a
    non-negative int, and not a bool (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
