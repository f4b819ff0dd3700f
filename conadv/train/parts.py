"""The parts that train a micro-batch, built in one place for a trainer and an attack rank: an
attack rank makes the trainers' attack, so its model, BatchNorm routes, autocast, attack compiler
and data stream must be the trainers' own, not a copy that could drift from them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from conadv.adversarial import EngineContext, ViewEngine, build_engine
from conadv.checkpoints.weights import load_into, read_weights
from conadv.config import BatchPlan, RunConfig
from conadv.data import BatchStream, build_train_stream
from conadv.data.loader import LOADERS, SOURCES, check_data
from conadv.data.transforms import build_batch_mix
from conadv.distill import TeacherEnsemble, build_teachers
from conadv.models import ARCHITECTURES, build_model, check_arch
from conadv.optim import OPTIMIZERS, check_optimizer
from conadv.train.runtime import attack_compiler, autocast_dtype, autocast_factory

if TYPE_CHECKING:
    from conadv.adversarial.attack_ranks import AttackLink


def check_factories(cfg: RunConfig) -> None:
    """The names and rules that belong to the factories (data sources and loaders,
    architectures, optimizers), checked before any work: the config module sits below the
    factories and does not know their registries. Each factory also refuses a name it lacks
    when it is called."""
    check_data(cfg.data)
    check_arch("model.arch", cfg.model.arch)
    if cfg.distill.enabled:
        for i, teacher in enumerate(cfg.distill.teachers):
            if teacher.arch:
                check_arch(f"distill.teachers[{i}].arch", teacher.arch)
    check_optimizer(cfg.optim)


def registered_names() -> dict[str, list[str]]:
    """The names each factory-owned key takes, for `conadv-train --help-config`."""
    return {"data.name": list(SOURCES), "data.loader": list(LOADERS),
            "model.arch": [*ARCHITECTURES, "timm:<name>"], "optim.name": list(OPTIMIZERS)}


@dataclass
class TrainingParts:
    """A model with its BatchNorm converted for the engine's views, the engine, and the
    autocast every forward of the run uses."""

    model: nn.Module  # the plain module (never the DDP wrapper)
    engine: ViewEngine
    autocast: Callable[[], AbstractContextManager]
    amp_dtype: torch.dtype | None
    teachers: TeacherEnsemble | None  # distillation's, which the engine runs with the side work


def train_stream(cfg: RunConfig, plan: BatchPlan, rank: int, device: torch.device
                 ) -> BatchStream:
    """Trainer `rank`'s micro-batches, as the trainer reads them and as its attack rank reads
    them to attack the same images."""
    return build_train_stream(cfg.data, plan.world_size, rank, plan.per_device,
                              plan.accumulation, cfg.train.seed, device)


def build_training_parts(cfg: RunConfig, plan: BatchPlan, num_classes: int,
                         device: torch.device, *, init_from: bool = False,
                         attack_link: AttackLink | None = None) -> TrainingParts:
    """`init_from`: load model.init_from before the engine copies the main BatchNorm into
    the auxiliary ones (a new run; a resume reads its checkpoint instead). `attack_link`: the
    trainers' end of adv.attack_ranks, which then make the fresh attacks."""
    model = build_model(cfg.model, num_classes).to(device)
    if init_from and cfg.model.init_from:
        load_into(model.backbone, read_weights(cfg.model.init_from, "model.init_from"),
                  cfg.model.init_strict, "model.init_from")
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    autocast = autocast_factory(device, amp_dtype)
    teachers = (build_teachers(cfg.distill, num_classes, device, cfg.model.channels_last,
                               autocast) if cfg.distill.enabled else None)
    # the engine converts the model's BatchNorm, so it comes before optimizer and DDP
    engine = build_engine(cfg.adv, model, EngineContext(
        device=device, num_classes=num_classes, seed=cfg.train.seed,
        accumulation=plan.accumulation, channels_last=cfg.model.channels_last,
        second_view=cfg.data.second_view, autocast=autocast,
        mix=build_batch_mix(cfg.train, num_classes),
        compile=attack_compiler(cfg.train.compile, cfg.train.compile_mode, device),
        teachers=teachers, attack_link=attack_link))
    return TrainingParts(model, engine, autocast, amp_dtype, teachers)
