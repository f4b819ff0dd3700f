"""Moving a uint8 batch to the device and turning it into [0, 1] float images there."""

from __future__ import annotations

from typing import Any

import torch

from conadv.streams import streams_for


def images_to_device(images: torch.Tensor, device: torch.device,
                     channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] (pinned on CUDA runs) -> float32 in [0, 1] on `device`."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def batch_to_device(batch: dict[str, Any], device: torch.device,
                    channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Images (float [0, 1]) and labels on the device, on the current stream; host-side
    counters stay behind. A batch made on another stream (decoded on the GPU) carries the
    event that marks it written, `ready`: the current stream waits for it and marks the
    batch's device tensors as its own too (so their memory outlives this use)."""
    ready = batch.get("ready")
    if ready is not None:
        streams = streams_for(device)
        current = streams.current()
        current.wait_event(ready)
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                streams.keep_alive(value, current)
    moved = {"label": batch["label"].to(device, non_blocking=True)}
    for key, value in batch.items():
        if key.endswith("image"):
            moved[key] = images_to_device(value, device, channels_last)
    return moved
