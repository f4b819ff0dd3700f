"""Clean evaluation, exact across ranks: every validation image is counted once."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from conadv.data.device import images_to_device
from conadv.distributed import all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False,
             autocast: Callable[[], AbstractContextManager] | None = None) -> dict[str, float]:
    """top-1 / top-5 accuracy (percent), mean loss and count, summed over all ranks."""
    was_training = model.training
    model.eval()
    # correct@1, correct@5, summed loss, count; float64 so large counts stay exact
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in loader:
        x = images_to_device(batch["image"], device, channels_last)
        y = batch["label"].to(device, non_blocking=True)
        if autocast is None:
            logits = model(x)
        else:
            with autocast():
                logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(y[:, None])
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                             F.cross_entropy(logits, y, reduction="sum"),
                             torch.tensor(len(y), device=device)]).double()
    all_reduce_sum(sums)
    model.train(was_training)
    correct1, correct5, loss, count = sums.tolist()
    count = max(count, 1.0)
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count,
            "loss": loss / count, "count": int(sums[3].item())}
