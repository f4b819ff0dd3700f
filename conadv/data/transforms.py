"""Train and eval transforms on uint8 CHW tensors, built from torchvision.transforms.v2."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from conadv.config import DataConfig, TrainConfig

Transform = Callable[[torch.Tensor], torch.Tensor]


def build_policy(name: str) -> Transform | None:
    """The optional augmentation policy (AutoAugment uses its ImageNet policy)."""
    policies = {
        "none": None,
        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
        "randaugment": v2.RandAugment,
        "trivialaugment": v2.TrivialAugmentWide,
    }
    factory = policies[name]
    return factory() if factory else None


def build_train_transforms(cfg: DataConfig) -> tuple[Transform, Transform | None]:
    """(clean view transform, augmented-view transform applied on top of the clean view or None).

    Without `second_view` the policy is part of the single training view.
    """
    steps: list[Transform] = [v2.RandomResizedCrop(cfg.image_size,
                                                   scale=(cfg.min_crop_scale, 1.0),
                                                   antialias=True)]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    policy = build_policy(cfg.augment)
    if policy is not None and not cfg.second_view:
        steps.append(policy)
    return v2.Compose(steps), (policy if cfg.second_view else None)


def build_eval_transform(cfg: DataConfig) -> Transform:
    return v2.Compose([v2.Resize(cfg.eval_resize, antialias=True), v2.CenterCrop(cfg.eval_crop)])


def build_batch_mix(cfg: TrainConfig, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix of a batch (one of them per batch when both are on), or None."""
    options = []
    if cfg.mixup_alpha > 0:
        options.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        options.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not options:
        return None
    return options[0] if len(options) == 1 else v2.RandomChoice(options)
