"""What one training step reports, and the window of steps between two log lines. Device
values are summed as tensors and read on the host only when a line is logged."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from conadv.distributed import all_reduce_sum


@dataclass
class StepResult:
    loss: Tensor | None = None  # mean over the micro-batches, on the device
    stats: dict[str, Tensor] = field(default_factory=dict)  # per-view losses, adv_success
    data_time: float = 0.0
    attack_seconds: float = 0.0  # host seconds spent in attacks (all of it on the CPU)
    source_step: int | None = None  # step whose weights made the adversarial view
    cuda_events: dict[str, Any] = field(default_factory=dict)  # for the overlap measurement

    def add(self, loss: Tensor, stats: dict[str, Tensor], inputs, accumulation: int) -> None:
        """One micro-step's values; a step without accumulation keeps them as they are (no
        device operation: each is a kernel launch on a GPU)."""
        if accumulation > 1:
            loss = loss / accumulation
            stats = {key: value / accumulation for key, value in stats.items()}
        self.loss = loss if self.loss is None else self.loss + loss
        for key, value in stats.items():
            self.stats[key] = value if key not in self.stats else self.stats[key] + value
        self.source_step = inputs.source_step


def cuda_overlap(events: dict[str, Any]) -> dict[str, float]:
    """Attack and train time of one step from CUDA events (call after a synchronize), and the
    overlap (T_attack + T_train - T_span) / min(T_attack, T_train)."""
    if not {"attack_begin", "attack_end", "train_begin", "train_end"} <= set(events):
        return {}
    origin = events["train_begin"]
    at = {name: origin.elapsed_time(event) for name, event in events.items()}
    t_attack = at["attack_end"] - at["attack_begin"]
    t_train = at["train_end"] - at["train_begin"]
    t_span = max(at["attack_end"], at["train_end"]) - min(at["attack_begin"], 0.0)
    overlap = (t_attack + t_train - t_span) / max(min(t_attack, t_train), 1e-9)
    return {"attack_ms": t_attack, "train_ms": t_train, "overlap": overlap}


class MetricWindow:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.loss = torch.zeros((), device=self.device)
        self.stats: dict[str, Tensor] = {}
        self.data_time = 0.0
        self.attack_seconds = 0.0
        self.last: StepResult | None = None

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.loss += result.loss
        for key, value in result.stats.items():
            self.stats[key] = self.stats.get(key, 0.0) + value
        self.data_time += result.data_time
        self.attack_seconds += result.attack_seconds
        self.last = result

    def record(self, world_size: int) -> dict[str, float]:
        """Means over steps and ranks (a collective: every rank calls it at the same step)."""
        names = sorted(self.stats)
        stacked = torch.stack([self.loss, *(self.stats[n] for n in names)]).float()
        means = (all_reduce_sum(stacked) / (self.steps * world_size)).tolist()
        record = {"loss": means[0], **dict(zip(names, means[1:])),
                  "data_time": self.data_time / self.steps}
        if self.last is not None and self.last.source_step is not None:
            # 1-based like `step`: the step during which (and with whose starting weights) the
            # adversarial examples trained on in the logged step were made
            record["adv_source_step"] = self.last.source_step + 1
            host = self.attack_seconds / self.steps
            record["attack_time"] = host  # CPU: the attack itself
            device_times = cuda_overlap(self.last.cuda_events)
            if device_times:  # CUDA: the host only launched it; the events time the device
                record.update(device_times)
                record["attack_time"] = device_times["attack_ms"] / 1000
                record["attack_launch_time"] = host
        return record
