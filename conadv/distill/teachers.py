"""Frozen teachers and their ensemble's soft targets."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conadv.checkpoints.weights import Weights, load_into, read_weights
from conadv.config import DistillConfig, ModelConfig, TeacherConfig
from conadv.errors import CheckpointError, ConfigError
from conadv.models import ImageClassifier, build_model

log = logging.getLogger(__name__)


def build_teacher(cfg: TeacherConfig, index: int,
                  num_classes: int) -> tuple[ImageClassifier, str]:
    """One teacher on the CPU, weights loaded strictly, frozen, in eval mode, and the SHA-256
    of its weights file. Inputs are in [0, 1] pixel space like the student's: the teacher
    normalises them itself (ImageNet statistics, or a timm model's own)."""
    what = f"distill.teachers[{index}]"
    weights: Weights = read_weights(cfg.weights, f"{what}.weights")
    if weights.model is not None:  # a conadv checkpoint knows its architecture
        if cfg.arch and cfg.arch != weights.model.arch:
            raise ConfigError(f"{what}.arch={cfg.arch} but {weights.source} holds a "
                              f"{weights.model.arch}; leave arch empty for conadv checkpoints")
        model_cfg = ModelConfig(arch=weights.model.arch, cifar_width=weights.model.cifar_width,
                                cifar_blocks=weights.model.cifar_blocks)
        teacher = build_model(model_cfg, num_classes)
    elif not cfg.arch:
        raise ConfigError(f"{what}.arch must name the architecture of the state-dict file "
                          f"{cfg.weights}")
    else:  # timm models normalise with their own mean and std
        teacher = build_model(ModelConfig(arch=cfg.arch, cifar_width=cfg.cifar_width,
                                          cifar_blocks=cfg.cifar_blocks), num_classes)
    load_into(teacher.backbone, weights, strict=True, what=f"{what}: the weights file")
    return teacher.eval().requires_grad_(False), weights.sha256


class TeacherEnsemble:
    """images -> mean over teachers of softmax(logits / T): the student's soft targets.
    Teachers are plain modules (never DDP), in eval mode (BatchNorm running statistics), under
    no_grad: no collective, no .grad, no state change.

    Its checkpoint state is the SHA-256 of each teacher's weights file, never the weights: a
    resume checks that the teachers are those the run was trained with."""

    def __init__(self, teachers: list[nn.Module], temperature: float,
                 autocast: Callable[[], AbstractContextManager] | None = None,
                 fingerprints: list[str] | None = None) -> None:
        self.teachers = teachers
        self.temperature = temperature
        self.autocast = autocast or nullcontext
        self.fingerprints = fingerprints or []

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        total: Tensor | None = None
        for teacher in self.teachers:
            with self.autocast():
                logits = teacher(images)
            probs = F.softmax(logits.float() / self.temperature, dim=1)
            total = probs if total is None else total + probs
        return total / len(self.teachers)

    def state_dict(self) -> dict[str, list[str]]:
        return {"sha256": list(self.fingerprints)}

    def load_state_dict(self, state: dict[str, list[str]], strict: bool = True) -> None:
        """`strict=False` (an allowed config change): other teachers are logged, not refused."""
        saved = state["sha256"]
        changed = [i for i, (old, new) in enumerate(zip(saved, self.fingerprints)) if old != new]
        if len(saved) == len(self.fingerprints) and not changed:
            return
        which = (f"distill.teachers[{changed[0]}]'s weights file changed" if changed else
                 f"the run was trained with {len(saved)} teachers, not {len(self.fingerprints)}")
        if not strict:
            log.warning("%s since the checkpoint; continuing with the new teachers", which)
            return
        raise CheckpointError(f"{which} since the checkpoint was written; restore the "
                              "teachers, or continue with them with "
                              "checkpoint.allow_config_change=true")


def build_teachers(cfg: DistillConfig, num_classes: int, device: torch.device,
                   channels_last: bool,
                   autocast: Callable[[], AbstractContextManager] | None) -> TeacherEnsemble:
    teachers, fingerprints = [], []
    for index, teacher_cfg in enumerate(cfg.teachers):
        teacher, sha256 = build_teacher(teacher_cfg, index, num_classes)
        teacher = teacher.to(device)
        if channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
        teachers.append(teacher)
        fingerprints.append(sha256)
    log.info("distilling from %d teachers: %s", len(teachers),
             ", ".join(t.weights for t in cfg.teachers))
    return TeacherEnsemble(teachers, cfg.temperature, autocast, fingerprints)
