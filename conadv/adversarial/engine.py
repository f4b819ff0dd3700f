"""The ConAdv engine: which images a training step sees, and with which BatchNorm.

Vanilla training, the sequential baseline (tau = 0, "DisAdv") and ConAdv (tau >= 1) share one
path; only the policy differs:

- `ViewEngine` (adv.enabled=false): the clean view and, optionally, the augmented view.
- `ConAdvEngine`: keeps a queue of future micro-batches. At optimizer step t the trainer feeds it
  micro-batches until it holds tau*A + 1 of them (A = accumulation steps) and takes the oldest.
  Feeding launches the attack on that batch at once, with the weights of step t, on the
  executor (the attack CUDA stream). So the batch trained on at step t carries adversarial
  examples made at step t - tau, with the weights of step t - tau.
  The first tau steps: no earlier weights exist, so the queue is filled at step 0 and the
  batches of steps 0..tau all carry attacks made with the initial weights (staleness t < tau at
  step t); from step tau on, adv_source_step == step - tau exactly. tau = 0 feeds one batch and
  takes it back: attack, then train, in the same step.

Each step's loss is the weighted mean of the per-view cross-entropies over [clean, optional
augmented, adversarial] (equal weights by default, as published); each view is normalised by
its own BatchNorm (main / aug / adv routes, see models/multi_bn.py). Attack randomness is seeded
by the batch's identity (run seed + global batch index), so it does not depend on the rank or
on the restart, and the queue (clean batches, adversarial images, source steps) is saved in
every checkpoint, per rank.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from conadv.adversarial.attacks import AttackSpec, perturb
from conadv.adversarial.streams import Launched, SequentialExecutor
from conadv.data.device import batch_to_device
from conadv.errors import CheckpointError
from conadv.models.multi_bn import MAIN, bn_views

Batch = dict[str, Tensor]


@dataclass
class TrainInputs:
    """One micro-batch as the model sees it: views concatenated along dim 0."""

    images: Tensor
    targets: Tensor
    labels: Tensor  # hard labels of one view (for success rates)
    views: list[tuple[str, int, float]]  # (view, rows, loss weight), in batch order
    key: int
    source_step: int | None = None  # step whose weights made the adversarial view
    attack_seconds: float = 0.0  # host time of the attack that made the adversarial view


@dataclass(frozen=True)
class ViewWeights:
    clean: float = 1.0
    aug: float = 1.0
    adv: float = 1.0


class ViewEngine:
    """Vanilla training: clean view (+ augmented view). No attack, no queue."""

    def __init__(self, device: torch.device, channels_last: bool, weights: ViewWeights,
                 routes: dict[str, str], mix: Callable | None = None) -> None:
        self.device = device
        self.channels_last = channels_last
        self.weights = weights
        self.routes = routes
        self.mix = mix
        self._pending: tuple[Batch, int] | None = None

    # the trainer's protocol -----------------------------------------------------------
    def wants_batch(self) -> bool:
        return self._pending is None

    def feed(self, batch: Batch, key: int, step: int) -> None:
        self._pending = (batch, key)

    def take(self) -> TrainInputs:
        batch, key = self._pending
        self._pending = None
        moved = batch_to_device(batch, self.device, self.channels_last)
        return self._assemble(moved, key, adv=None)

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # shared by both engines -----------------------------------------------------------
    def _assemble(self, moved: Batch, key: int, adv: Tensor | None,
                  source_step: int | None = None) -> TrainInputs:
        labels = moved["label"]
        images = [moved["image"]]
        views = [("clean", labels.shape[0], self.weights.clean)]
        if "aug_image" in moved:
            images.append(moved["aug_image"])
            views.append(("aug", labels.shape[0], self.weights.aug))
        if adv is not None:
            images.append(adv)
            views.append(("adv", labels.shape[0], self.weights.adv))
        targets: Tensor = labels
        if self.mix is not None:  # vanilla only: each view mixed on its own
            mixed = [self.mix(x, labels) for x in images]
            images = [x for x, _ in mixed]
            targets = torch.cat([t for _, t in mixed])
        else:
            targets = labels.repeat(len(images))
        return TrainInputs(torch.cat(images) if len(images) > 1 else images[0], targets, labels,
                           views, key, source_step)

    def bn_plan(self, inputs: TrainInputs) -> list[tuple[str, int]]:
        return [(self.routes.get(view, MAIN), rows) for view, rows, _ in inputs.views]

    def loss(self, criterion: nn.Module, logits: Tensor,
             inputs: TrainInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted mean of per-view losses; per-view losses and the adversarial success rate
        (misclassified adversarial images) as detached device tensors."""
        logits = logits.float()
        total = logits.new_zeros(())
        weight_sum = 0.0
        stats: dict[str, Tensor] = {}
        start = 0
        for view, rows, weight in inputs.views:
            part = criterion(logits[start:start + rows], inputs.targets[start:start + rows])
            stats[f"{view}_loss"] = part.detach()
            if view == "adv":
                wrong = logits[start:start + rows].argmax(dim=1) != inputs.labels
                stats["adv_success"] = wrong.float().mean()
            total = total + weight * part
            weight_sum += weight
            start += rows
        return total / weight_sum, stats


@dataclass
class _Pending:
    launched: Launched
    key: int
    source_step: int
    batch: Batch  # as loaded (uint8, CPU): what a checkpoint stores


class ConAdvEngine(ViewEngine):
    """Adversarial views made tau optimizer steps ahead, with the weights of that step."""

    def __init__(self, model: nn.Module, spec: AttackSpec, tau: int, accumulation: int,
                 executor, num_classes: int, seed: int, device: torch.device,
                 channels_last: bool, weights: ViewWeights, routes: dict[str, str],
                 autocast: Callable | None = None) -> None:
        super().__init__(device, channels_last, weights, routes)
        self.model = model
        self.spec = spec
        self.tau = tau
        self.accumulation = accumulation
        self.executor = executor
        self.num_classes = num_classes
        self.seed = seed
        self.autocast = autocast
        self.queue: deque[_Pending] = deque()
        self.last_launched_events: tuple[Any, Any] | None = None  # CUDA timing of the newest

    def wants_batch(self) -> bool:
        return len(self.queue) < self.tau * self.accumulation + 1

    def feed(self, batch: Batch, key: int, step: int) -> None:
        launched = self.executor.launch(lambda: self._prepare(batch, key))
        self.last_launched_events = launched.events
        self.queue.append(_Pending(launched, key, step, batch))

    def take(self) -> TrainInputs:
        pending = self.queue.popleft()
        moved = self.executor.consume(pending.launched)
        adv = moved.pop("adv")
        inputs = self._assemble(moved, pending.key, adv, pending.source_step)
        inputs.attack_seconds = pending.launched.seconds
        return inputs

    def before_optimizer_step(self) -> None:
        self.executor.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.executor.after_optimizer_step()

    # the attack --------------------------------------------------------------------------
    def attack_generator(self, key: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            (self.seed * 1_000_003 + key) % (2**63))

    def make_adversarial(self, model: nn.Module, images: Tensor, labels: Tensor,
                         key: int) -> Tensor:
        """The attack on one micro-batch with `model`'s current weights: batch statistics of the
        adversarial BatchNorm, no running statistic touched, no .grad written."""
        with bn_views(model, [(self.routes.get("adv", MAIN), labels.shape[0])],
                      update_stats=False):
            return perturb(model, images, labels, self.spec, self.num_classes,
                           self.attack_generator(key), self.autocast)

    def _prepare(self, batch: Batch, key: int) -> Batch:
        """Runs on the executor: copy the batch to the device, then attack it."""
        moved = batch_to_device(batch, self.device, self.channels_last)
        adv = self.make_adversarial(self.model, moved["image"], moved["label"], key)
        if self.channels_last:
            adv = adv.contiguous(memory_format=torch.channels_last)
        return {**moved, "adv": adv}

    # state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The queue between two optimizer steps: clean batches, their adversarial images and
        the steps whose weights made them."""
        self.executor.synchronize()
        return {"tau": self.tau, "accumulation": self.accumulation, "queue": [
            {"batch": {k: v.clone() for k, v in p.batch.items()}, "key": p.key,
             "source_step": p.source_step, "adv": p.launched.value["adv"].detach().cpu()}
            for p in self.queue]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["tau"], state["accumulation"]) != (self.tau, self.accumulation):
            raise CheckpointError(
                f"the checkpoint's ConAdv queue was made with adv.tau={state['tau']} and "
                f"accumulation {state['accumulation']}; this run has adv.tau={self.tau} and "
                f"accumulation {self.accumulation}")
        self.queue.clear()
        for item in state["queue"]:
            moved = batch_to_device(item["batch"], self.device, self.channels_last)
            adv = item["adv"].to(self.device)
            if self.channels_last:
                adv = adv.contiguous(memory_format=torch.channels_last)
            launched = Launched({**moved, "adv": adv}, None)
            self.queue.append(_Pending(launched, item["key"], item["source_step"],
                                       item["batch"]))


def build_engine(adv_cfg, data_second_view: bool, model: nn.Module, accumulation: int,
                 executor, num_classes: int, seed: int, device: torch.device,
                 channels_last: bool, mix: Callable | None,
                 autocast: Callable | None) -> ViewEngine:
    """The engine a config asks for; `model` is the plain module (never the DDP wrapper)."""
    weights = ViewWeights(adv_cfg.clean_weight, adv_cfg.aug_weight, adv_cfg.adv_weight)
    routes = bn_routes(adv_cfg, data_second_view)
    if not adv_cfg.enabled:
        return ViewEngine(device, channels_last, weights, routes, mix)
    spec = AttackSpec(adv_cfg.epsilon, adv_cfg.step_size, adv_cfg.steps,
                      adv_cfg.random_start_prob, adv_cfg.targeted)
    return ConAdvEngine(model, spec, adv_cfg.tau, accumulation, executor or SequentialExecutor(),
                        num_classes, seed, device, channels_last, weights, routes, autocast)


def bn_routes(adv_cfg, data_second_view: bool) -> dict[str, str]:
    """view -> BatchNorm route; auxiliary routes exist only for views that are used."""
    routes = {"clean": MAIN}
    if data_second_view:
        routes["aug"] = "aug" if adv_cfg.aug_bn else MAIN
    if adv_cfg.enabled:
        routes["adv"] = "adv" if adv_cfg.aux_bn else MAIN
    return routes


def auxiliary_routes(routes: dict[str, str]) -> list[str]:
    return sorted({r for r in routes.values() if r != MAIN})

