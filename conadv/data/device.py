"""Moving a uint8 batch to the device and turning it into [0, 1] float images there."""

from __future__ import annotations

import torch


def images_to_device(images: torch.Tensor, device: torch.device,
                     channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] (pinned on CUDA runs) -> float32 in [0, 1] on `device`."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device,
                    channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Images (float [0, 1]) and labels on the device; host-side counters stay behind."""
    moved = {"label": batch["label"].to(device, non_blocking=True)}
    for key, value in batch.items():
        if key.endswith("image"):
            moved[key] = images_to_device(value, device, channels_last)
    return moved
