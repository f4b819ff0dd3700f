"""The ConAdv engine: which images a training step sees, with which BatchNorm and which
targets.

This package is the only place that knows ConAdv. An engine is built from the typed `adv`
config and a small `EngineContext` (conadv/train/parts.py does, for a trainer and an attack rank
alike); it converts the model's BatchNorm, picks where its side work runs (a side stream,
inline, or the attack ranks), and hands the trainer micro-batches (`take`), a forward context
that routes each view to its BatchNorm, a label for the summary and its timing.

Vanilla training, the sequential baseline (tau = 0, "DisAdv") and ConAdv (tau >= 1) share one
path; only the policy differs:

- `ViewEngine` (adv.enabled=false, no teachers): the clean view and, optionally, the augmented
  view.
- `LookaheadEngine`: keeps a queue of future micro-batches. At optimizer step t the trainer
  feeds it micro-batches until it holds L*A + 1 of them (L = lookahead in optimizer steps,
  A = accumulation steps) and takes the oldest. Feeding launches the batch's side work at once
  on the executor (the side CUDA stream): the attack, with the weights of step t, and the
  teachers' soft targets when distilling. With ConAdv L = tau, so the batch trained on at
  step t carries adversarial examples made at step t - tau, with the weights of step t - tau.
  The first tau steps: no earlier weights exist, so the queue is filled at step 0 and the
  batches of steps 0..tau all carry attacks made with the initial weights (staleness t < tau at
  step t); from step tau on, adv_source_step == step - tau exactly. tau = 0 feeds one batch and
  takes it back: attack, then train, in the same step. Distillation without ConAdv uses L = 1:
  the teachers' outputs do not depend on the student, so they are computed one step ahead,
  beside the student's step.

Each micro-batch goes to the model as its views, [clean, optional augmented, adversarial], each
normalised by its own BatchNorm (main / aug / adv routes, see models/multi_bn.py), with each
view's loss weight (equal by default, as published); what the step minimises over them is the
objective's (conadv/train/objectives.py). When distilling, the teachers see the clean and the
augmented images; the adversarial view, a perturbation of the clean image, is taught the clean
image's soft targets. Attack randomness
is seeded by the batch's identity (run seed + global batch index), so it does not depend on the
rank or on the restart.

What a checkpoint keeps of the queue is what determines it, not its tensors: an attack is a pure
function of (weights, batch, batch key) and the teachers' outputs a function of the batch, so
the engine saves the source step of each queued optimizer step and the weights of those source
steps (at most tau snapshots, copied when a fresh batch is fed). On resume the trainer
positions the data stream at the first untrained step; the engine then refills its queue from
the stream as usual, but attacks the replayed batches with the saved weights (the teachers just
run again). No image and no teacher output is stored, and the queue is rebuilt for whatever
number of ranks and accumulation split the resumed job has.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from conadv.adversarial.attacks import AttackSpec, perturb
from conadv.adversarial.executors import Executor, FreshBatch, Launched, build_executor
from conadv.config import AdvConfig
from conadv.data.device import batch_to_device
from conadv.errors import CheckpointError, ConfigError
from conadv.models.multi_bn import (
    MAIN,
    bn_views,
    convert_to_multi_bn,
    other_normalisation,
    routable,
)
from conadv.randomness import MIXING, attack_seed, batch_seed, seeded

if TYPE_CHECKING:
    from conadv.adversarial.attack_ranks import AttackLink

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]
Weights = dict[str, Tensor]


@dataclass(frozen=True, kw_only=True)
class EngineContext:
    """What an engine needs to know about the run, besides its `adv` config (by keyword)."""

    device: torch.device
    num_classes: int
    seed: int
    accumulation: int = 1
    channels_last: bool = False
    second_view: bool = False  # the data yields an augmented view of each image
    autocast: Callable[[], AbstractContextManager] | None = None
    mix: Callable | None = None  # MixUp/CutMix (vanilla only)
    # compiles the attack's forward (train.compile, with its mode); None: eager
    compile: Callable[[nn.Module], nn.Module] | None = None
    # distillation: images -> the teachers' mean softmax (no grad, no collective)
    teachers: Callable[[Tensor], Tensor] | None = None
    # adv.attack_ranks, on a trainer: fresh attacks come from the attack ranks (their executor)
    attack_link: AttackLink | None = None


@dataclass
class TrainInputs:
    """One micro-batch as the model sees it: views concatenated along dim 0."""

    images: Tensor
    targets: Tensor
    labels: Tensor  # hard labels of one view (for success rates)
    views: list[tuple[str, int, float]]  # (view, rows, loss weight), in batch order
    key: int
    source_step: int | None = None  # step whose weights made the adversarial view
    attack_seconds: float = 0.0  # host time of the side work (attack, teachers) of the batch
    soft_targets: Tensor | None = None  # distillation: the teachers' probabilities, row by row
    # the side work this micro-batch cost (counted, not timed: the study matches compute on it)
    attack_image_steps: int = 0  # images x attack steps (each a forward and an input gradient)
    teacher_images: int = 0  # images the teacher ensemble saw (each teacher runs on each)


@dataclass(frozen=True)
class ViewWeights:
    clean: float = 1.0
    aug: float = 1.0
    adv: float = 1.0


class ViewEngine:
    """Vanilla training: clean view (+ augmented view). No attack, no queue."""

    label = "vanilla"

    def __init__(self, model: nn.Module, context: EngineContext, weights: ViewWeights,
                 routes: dict[str, str]) -> None:
        self.model = model
        self.context = context
        self.device = context.device
        self.weights = weights
        self.routes = routes
        self._pending: tuple[Batch, int] | None = None

    # the trainer's protocol -----------------------------------------------------------
    def wants_batch(self) -> bool:
        return self._pending is None

    def feed(self, batch: Batch, key: int, step: int) -> None:
        self._pending = (batch, key)

    def take(self) -> TrainInputs:
        batch, key = self._pending
        self._pending = None
        moved = batch_to_device(batch, self.device, self.context.channels_last)
        return self._assemble(moved, key, adv=None, soft=None)

    def forward_context(self, inputs: TrainInputs) -> AbstractContextManager:
        """Wrap the training forward of `inputs`: routes each view to its BatchNorm."""
        plan = [(self.routes.get(view, MAIN), rows) for view, rows, _ in inputs.views]
        return bn_views(self.model, plan)

    def begin_step(self, step: int) -> None:
        pass

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def drain(self) -> None:
        """End of a clean run: wait for the side work still in flight."""

    def summary(self) -> dict[str, Any]:
        """What the engine adds to the run summary (its executor's costs)."""
        return {}

    def attack_events(self) -> tuple[Any, Any] | None:
        """CUDA (begin, end) events of the newest attack, for the overlap measurement."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        pass

    # shared by both engines -----------------------------------------------------------
    def _assemble(self, moved: Batch, key: int, adv: Tensor | None,
                  soft: dict[str, Tensor] | None, source_step: int | None = None) -> TrainInputs:
        """`soft`: the teachers' probabilities of the clean (and augmented) images."""
        labels = moved["label"]
        images = [moved["image"]]
        views = [("clean", labels.shape[0], self.weights.clean)]
        soft_views = ["clean"]
        if "aug_image" in moved:
            images.append(moved["aug_image"])
            views.append(("aug", labels.shape[0], self.weights.aug))
            soft_views.append("aug")
        if adv is not None:
            images.append(adv)
            views.append(("adv", labels.shape[0], self.weights.adv))
            soft_views.append("clean")  # a perturbed clean image keeps the clean targets
        targets: Tensor = labels
        mix = self.context.mix
        if mix is not None:  # vanilla only: each view mixed on its own
            # seeded by the batch key, so mixing does not depend on the rank or a restart
            with seeded(batch_seed(self.context.seed, key, MIXING)):
                mixed = [mix(x, labels) for x in images]
            images = [x for x, _ in mixed]
            targets = torch.cat([t for _, t in mixed])
        else:
            targets = labels.repeat(len(images)) if len(images) > 1 else labels
        soft_targets = torch.cat([soft[v] for v in soft_views]) if soft is not None else None
        return TrainInputs(torch.cat(images) if len(images) > 1 else images[0], targets, labels,
                           views, key, source_step, soft_targets=soft_targets)


@dataclass
class _Pending:
    launched: Launched  # the side work: {"adv": images, "soft": {view: probs}}, on the device
    key: int
    source_step: int
    batch: Batch  # the clean batch as loaded (uint8, pinned on CUDA): on the host until taken


class LookaheadEngine(ViewEngine):
    """Batches fed `lookahead` optimizer steps before they are trained; their side work (the
    attack with the weights of the feeding step, the teachers' outputs) runs meanwhile.
    `spec=None`: no attack (distillation alone). Where the side work runs is the executor's:
    on a side stream, inline, or (fresh attacks) on the attack ranks."""

    def __init__(self, model: nn.Module, context: EngineContext, weights: ViewWeights,
                 routes: dict[str, str], spec: AttackSpec | None, lookahead: int,
                 executor: Executor) -> None:
        super().__init__(model, context, weights, routes)
        self.spec = spec
        self.tau = lookahead if spec is not None else None  # the attack's staleness
        self.lookahead = lookahead
        self.accumulation = context.accumulation
        self.executor = executor
        if spec is None:
            self.label = "vanilla"
        else:
            self.label = (f"ConAdv tau={lookahead}" if lookahead
                          else "sequential adversarial (tau=0)")
        self.queue: deque[_Pending] = deque()
        # the attack's forward (compiled: one graph for the adversarial BatchNorm route)
        self._attack_forward = context.compile(model) if context.compile else model
        self._last_events: tuple[Any, Any] | None = None
        # weights of the source steps the queue refers to (what a checkpoint saves)
        self._snapshots: dict[int, Weights] = {}
        # after a resume: the source step of each micro-batch still to be replayed
        self._replay: deque[int] = deque()
        self._restored: dict[int, Weights] = {}
        self._replica: tuple[int, nn.Module] | None = None

    def wants_batch(self) -> bool:
        return len(self.queue) < self.lookahead * self.accumulation + 1

    def begin_step(self, step: int) -> None:
        """Tell the executor which steps this step's weights attack fresh: all up to
        step + lookahead that are neither queued nor to be replayed (attack ranks need it)."""
        first = step + (len(self.queue) + len(self._replay)) // self.accumulation
        self.executor.begin_step(step, first, step + self.lookahead, self.model.parameters())

    def feed(self, batch: Batch, key: int, step: int) -> None:
        if self._replay:  # rebuilding the queue of a checkpoint: attack with the saved weights
            source = self._replay.popleft()
            self._snapshots[source] = self._restored[source]

            def job() -> dict[str, Any]:
                # the replica is loaded on the executor's stream, so after the attacks
                # launched before, which may still read its previous weights
                return self._prepare(self._replica_at(source), batch, key, source)

            launched = self.executor.launch(job)
        else:
            if self.tau:  # a checkpoint saves what the attack reads
                self._keep_weights(step)
            launched = self.executor.launch(lambda: self._prepare(self.model, batch, key, step),
                                            FreshBatch(batch, key, step))
            source = step
        self._last_events = launched.events
        self.queue.append(_Pending(launched, key, source, batch))

    def take(self) -> TrainInputs:
        pending = self.queue.popleft()
        made = self.executor.consume(pending.launched)
        moved = batch_to_device(pending.batch, self.device, self.context.channels_last)
        inputs = self._assemble(moved, pending.key, made.get("adv"), made.get("soft"),
                                pending.source_step if self.spec is not None else None)
        inputs.attack_seconds = pending.launched.seconds
        rows = inputs.labels.shape[0]
        if self.spec is not None:  # made here or on an attack rank: the job's work either way
            inputs.attack_image_steps = rows * self.spec.steps
        if self.context.teachers is not None:
            inputs.teacher_images = rows * (2 if "aug_image" in moved else 1)
        oldest = self.queue[0].source_step if self.queue else None
        for source in [s for s in self._snapshots if oldest is None or s < oldest]:
            del self._snapshots[source]
        return inputs

    def before_optimizer_step(self) -> None:
        self.executor.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.executor.after_optimizer_step()
        if not self._replay:  # replayed attacks are done (the optimizer waited for them)
            self._restored.clear()
            self._replica = None

    def drain(self) -> None:
        self.executor.drain()

    def summary(self) -> dict[str, Any]:
        return self.executor.summary()

    def attack_events(self) -> tuple[Any, Any] | None:
        return self._last_events

    # the attack --------------------------------------------------------------------------
    def attack_generator(self, key: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            attack_seed(self.context.seed, key))

    def make_adversarial(self, model: nn.Module, images: Tensor, labels: Tensor,
                         key: int) -> Tensor:
        """The attack on one micro-batch with `model`'s current weights: batch statistics of the
        adversarial BatchNorm, no running statistic touched, no .grad written."""
        forward = self._attack_forward if model is self.model else model
        with bn_views(model, [(self.routes.get("adv", MAIN), labels.shape[0])],
                      update_stats=False):
            return perturb(forward, images, labels, self.spec, self.context.num_classes,
                           self.attack_generator(key), self.context.autocast)

    def _prepare(self, model: nn.Module, batch: Batch, key: int,
                 source: int) -> dict[str, Any]:
        """Runs on the executor: copy the batch to the device, attack it, run the teachers.
        Only the adversarial images (and the teachers' probabilities) stay on the device while
        queued: the clean (and augmented) views are copied again from host memory when the
        batch is taken, so a queue of tau x A micro-batches holds one float view per
        micro-batch on the device, not two or three."""
        made: dict[str, Any] = {}
        moved = batch_to_device(batch, self.device, self.context.channels_last)
        if self.spec is not None:
            adv = self.make_adversarial(model, moved["image"], moved["label"], key)
            if self.context.channels_last:
                adv = adv.contiguous(memory_format=torch.channels_last)
            made["adv"] = adv
        teachers = self.context.teachers
        if teachers is not None:
            made["soft"] = {"clean": teachers(moved["image"])}
            if "aug_image" in moved:
                made["soft"]["aug"] = teachers(moved["aug_image"])
        return made

    def _keep_weights(self, source: int) -> None:
        """Snapshot the weights of step `source` once, for checkpoints, on the caller's stream
        before its optimizer step: the parameters only (the attack normalises with batch
        statistics, and the main stream's forward updates the running statistics meanwhile)."""
        if source not in self._snapshots:
            names, values = zip(*self.model.named_parameters())
            with torch.no_grad():  # one multi-tensor copy, not two operations per tensor:
                # x * 1 is x exactly (NaN, infinities and -0 included); torch has no
                # multi-tensor clone
                copies = torch._foreach_mul(list(values), 1)
            self._snapshots[source] = dict(zip(names, copies))

    def _replica_at(self, source: int) -> nn.Module:
        """A copy of the model holding the saved weights of step `source`. Runs on the
        executor (the side stream), whose earlier jobs may still read the previous ones."""
        if self._replica is None or self._replica[0] != source:
            replica = self._replica[1] if self._replica else copy.deepcopy(self.model)
            # every parameter (checked when the queue was loaded); buffers are not saved: the
            # attack runs on batch statistics
            replica.load_state_dict(self._restored[source], strict=False)
            self._replica = (source, replica)
        return self._replica[1]

    # state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Between two optimizer steps the queue holds tau whole optimizer steps; saved are the
        source step of each and the weights of those source steps (device tensors). Without an
        attack nothing: the teachers run again on the replayed batches."""
        self.executor.synchronize()
        if self.spec is None:
            return {}
        a = self.accumulation
        sources = [self.queue[i * a].source_step for i in range(len(self.queue) // a)]
        return {"tau": self.tau, "sources": sources,
                "snapshots": {s: self._snapshots[s] for s in sorted(set(sources))}}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """`strict=False` (an allowed config change): a queue made for another tau, or none
        (a vanilla checkpoint), is dropped and refilled with the current weights."""
        if self.spec is None:
            return
        if state.get("tau") != self.tau and not strict:
            log.warning("the checkpoint holds no ConAdv queue for adv.tau=%d; the queue is "
                        "refilled with the current weights", self.tau)
            return
        if state.get("tau") != self.tau:
            raise CheckpointError(f"the checkpoint's ConAdv queue was made with "
                                  f"adv.tau={state.get('tau')}; this run has adv.tau={self.tau}")
        sources, snapshots = state.get("sources"), state.get("snapshots")
        if not (isinstance(sources, list) and all(type(s) is int for s in sources)
                and isinstance(snapshots, dict) and set(snapshots) == set(sources)
                and all(isinstance(w, dict) and all(isinstance(v, torch.Tensor)
                                                    for v in w.values())
                        for w in snapshots.values())):
            raise CheckpointError("the checkpoint's ConAdv queue is not source steps with the "
                                  "weights of each (it was not written by conadv)")
        shapes = {name: p.shape for name, p in self.model.named_parameters()}
        saved = {name for weights in snapshots.values() for name in weights}
        if saved == shapes.keys() and any(
                w.get(name) is None or w[name].shape != shape
                for w in snapshots.values() for name, shape in shapes.items()):
            raise CheckpointError("the checkpoint's ConAdv weight snapshots do not have this "
                                  "model's shapes")
        if saved != shapes.keys():  # e.g. adv.aux_bn switched: not the weights these attacks need
            if strict:
                raise CheckpointError("the checkpoint's ConAdv weight snapshots do not match "
                                      "this model's parameters")
            log.warning("the checkpoint's ConAdv weight snapshots are for other parameters; "
                        "the queue is refilled with the current weights")
            return
        self.queue.clear()
        self._snapshots.clear()
        self._replay = deque(s for s in state["sources"] for _ in range(self.accumulation))
        # copies: the loaded state may be views into one buffer that should not outlive it
        self._restored = {s: {k: v.to(self.device, copy=True) for k, v in weights.items()}
                          for s, weights in state["snapshots"].items()}


def _check_normalisation(model: nn.Module, auxiliary: list[str], attacks: bool) -> None:
    """Auxiliary BatchNorms need BatchNorm2d layers to split; attacks need every running
    statistic to be one conadv can keep out of their forward passes."""
    others = other_normalisation(model)
    if auxiliary and others:
        knobs = " and ".join({"adv": "adv.aux_bn=false", "aug": "adv.aug_bn=false"}[route]
                             for route in auxiliary)
        raise ConfigError(f"the model normalises with {', '.join(others)}, which has no "
                          f"per-view statistics for an auxiliary BatchNorm; set {knobs}")
    tracked = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
               and m.track_running_stats and not routable(m)]
    if attacks and tracked:
        raise ConfigError(f"the model's {type(tracked[0]).__name__} layers keep running "
                          "statistics that the attacks' forward passes would change; use a "
                          "model with BatchNorm2d, LayerNorm or GroupNorm")


def build_engine(cfg: AdvConfig, model: nn.Module, context: EngineContext) -> ViewEngine:
    """The engine a config asks for. Converts `model`'s BatchNorm for the views that need their
    own (call before building the optimizer and wrapping in DDP); `model` is the plain module,
    never the DDP wrapper."""
    routes = {"clean": MAIN}
    if context.second_view:
        routes["aug"] = "aug" if cfg.aug_bn else MAIN
    if cfg.enabled:
        routes["adv"] = "adv" if cfg.aux_bn else MAIN
    auxiliary = sorted({r for r in routes.values() if r != MAIN})
    _check_normalisation(model, auxiliary, cfg.enabled)
    if cfg.enabled or auxiliary:
        # MultiBatchNorm also lets attacks run on batch statistics without touching
        # running statistics, so it is used whenever adversarial training is on.
        convert_to_multi_bn(model, auxiliary)
    weights = ViewWeights(cfg.clean_weight, cfg.aug_weight, cfg.adv_weight)
    if not cfg.enabled and context.teachers is None:
        return ViewEngine(model, context, weights, routes)
    executor = build_executor(cfg.executor, context.device, context.accumulation,
                              context.channels_last, context.attack_link)
    if not cfg.enabled:  # distillation alone: the teachers run one step ahead
        engine = LookaheadEngine(model, context, weights, routes, None, 1, executor)
    else:
        spec = AttackSpec(cfg.epsilon, cfg.step_size, cfg.steps, cfg.random_start_prob,
                          cfg.targeted)
        engine = LookaheadEngine(model, context, weights, routes, spec, cfg.tau, executor)
    if context.teachers is not None:
        engine.label += " + distillation"
    return engine
