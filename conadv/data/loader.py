"""Loaders built from the config, and the endless, resumable stream of training batches."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from conadv.config import DataConfig, shown
from conadv.data.dataset import ViewDataset
from conadv.data.sampler import ExactShardSampler, ResumableShardSampler
from conadv.data.shards import ShardSource
from conadv.data.sources import (
    DigitsSource,
    ImageFolderSource,
    ImageSource,
    MnistSource,
    SyntheticSource,
    shared_folder_index,
)
from conadv.data.transforms import build_eval_transform, build_train_transforms
from conadv.errors import ConfigError

Batch = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def _synthetic(cfg: DataConfig, split: str) -> ImageSource:
    samples = cfg.synthetic_samples if split == "train" else max(1, cfg.synthetic_samples // 8)
    return SyntheticSource(samples, cfg.synthetic_classes, cfg.image_size)


def _image_folder(cfg: DataConfig, split: str) -> ImageSource:
    classes, _ = shared_folder_index(Path(cfg.root) / "train")  # its order fixes the indices
    if split == "train":
        return ImageFolderSource(Path(cfg.root) / "train", classes, max_pixels=cfg.max_pixels)
    return ImageFolderSource(Path(cfg.root) / "val", classes, cfg.val_labels or None,
                             cfg.max_pixels)


@dataclass(frozen=True)
class SourceKind:
    """A dataset data.name can name: how to build a split of it ('train' or 'val'), and what
    data.root must hold ('' when it reads no files: nothing for a decoder such as DALI)."""

    build: Callable[[DataConfig, str], ImageSource]
    root: str = ""


# data.name's names
SOURCES: dict[str, SourceKind] = {
    "digits": SourceKind(lambda cfg, split: DigitsSource("train" if split == "train" else "test")),
    "mnist": SourceKind(lambda cfg, split: MnistSource("train" if split == "train"
                                                        else cfg.holdout)),
    "synthetic": SourceKind(_synthetic),
    "imagefolder": SourceKind(_image_folder, "the imagefolder directory (with train/ and val/)"),
    "shards": SourceKind(lambda cfg, split: ShardSource(cfg.root, split, cfg.max_pixels),
                         "the directory of shards made by conadv-pack"),
}
# data.loader's names: who decodes image files
LOADERS = ("auto", "torchvision", "dali")


def check_data(cfg: DataConfig) -> None:
    """One sentence unless data.name and data.loader are names this module serves, with what
    they need."""
    if cfg.name not in SOURCES:
        raise ConfigError(f"config key 'data.name' must be one of {', '.join(SOURCES)}; got "
                          f"{shown(cfg.name)}")
    if cfg.loader not in LOADERS:
        raise ConfigError(f"config key 'data.loader' must be one of {', '.join(LOADERS)}; got "
                          f"{shown(cfg.loader)}")
    kind = SOURCES[cfg.name]
    if kind.root and not cfg.root:
        raise ConfigError(f"data.root must name {kind.root}")
    if cfg.loader == "dali" and not kind.root:
        files = " or ".join(name for name, k in SOURCES.items() if k.root)
        raise ConfigError(f"data.loader=dali decodes image files: use data.name={files}, or "
                          "data.loader=torchvision")


def build_source(cfg: DataConfig, split: str) -> ImageSource:
    """split is 'train' or 'val'."""
    check_data(cfg)
    return SOURCES[cfg.name].build(cfg, split)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's start: schedulers (Slurm, Kubernetes) and torchrun signal every
    process of a job, and a worker that died of SIGTERM would crash its parent before the
    parent can write its checkpoint. Workers leave stopping to the parent: they ignore SIGINT
    and SIGUSR1, and a SIGTERM ends one only when its parent sent it (the parent's way of
    ending workers at exit; they also end themselves when it dies). A thread reads each
    SIGTERM with its sender (sigwaitinfo), which a signal handler cannot see."""
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for every thread from here

    def wait_for_the_parent() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_the_parent, name="conadv-sigterm", daemon=True).start()


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


class _SignalSafeLoader(DataLoader):
    """A DataLoader whose workers a job-wide stop signal cannot kill in the moment between
    their fork and `ignore_stop_signals`: the parent blocks the stop signals while it starts
    them (a child inherits the mask) and receives its own pending ones right after."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _loader(dataset: Dataset, sampler, batch_size: int, cfg: DataConfig, pin: bool,
            drop_last: bool) -> DataLoader:
    # A private generator: creating an iterator would otherwise draw from the global RNG and
    # shift every later random op (mixup, attacks) depending on when the iterator was made.
    # Augmentation randomness comes from per-sample seeds, not from worker seeds.
    return _SignalSafeLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.workers,
        pin_memory=pin, drop_last=drop_last, persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_stop_signals if cfg.workers > 0 else None)


def build_train_stream(cfg: DataConfig, world_size: int, rank: int, per_device_batch: int,
                       accumulation: int, seed: int, device: torch.device) -> BatchStream:
    source = build_source(cfg, "train")
    if cfg.name == "synthetic":  # noise needs no augmentation: keep benchmarks model-bound
        transform, aug = None, None
    else:
        transform, aug = build_train_transforms(cfg)
    dataset = ViewDataset(source, transform, aug, cfg.bad_images)
    sampler = ResumableShardSampler(len(source), world_size, rank, per_device_batch, seed,
                                    accumulation=accumulation)
    if sampler.steps_per_epoch == 0:
        raise ConfigError(f"the training set has {len(source)} images, fewer than one global "
                          f"batch ({per_device_batch} x {world_size} ranks x {accumulation} "
                          "accumulation)")
    if choose_loader(cfg, device) == "dali":
        from conadv.data.dali import DaliTrainLoader

        loader = DaliTrainLoader(source, sampler, cfg, device)
    else:
        loader = _loader(dataset, sampler, per_device_batch, cfg, device.type == "cuda",
                         drop_last=True)
    return BatchStream(loader, sampler, source.num_classes, accumulation)


_announced: set[tuple[str, str]] = set()


def choose_loader(cfg: DataConfig, device: torch.device) -> str:
    """'dali' or 'torchvision' for data.loader (auto: DALI when a CUDA device is used and
    DALI is installed), said once in the log with the reason."""
    from conadv.data.dali import dali_installed

    if cfg.loader != "auto":
        choice, why = cfg.loader, "data.loader says so"
    elif not SOURCES[cfg.name].root:
        choice, why = "torchvision", f"data.name={cfg.name} is not image files"
    elif device.type != "cuda":
        choice, why = "torchvision", "no CUDA device is used"
    elif not dali_installed():
        choice, why = "torchvision", "NVIDIA DALI is not installed (pip install '.[dali]')"
    else:
        choice, why = "dali", "a CUDA device is used and DALI is installed"
    if (choice, why) not in _announced:
        _announced.add((choice, why))
        log.info("images are decoded by %s: %s", choice, why)
    return choice


def build_eval_loader(cfg: DataConfig, world_size: int, rank: int, batch_size: int,
                      device: torch.device, split: str = "val", subset: int = 0,
                      seed: int = 0):
    """Exact evaluation of a split over ranks. `subset` > 0 takes that many images of the split,
    chosen by `seed` (the same whatever the number of ranks): the training split seen without
    augmentation, for the train-test gap."""
    source = build_source(cfg, split)
    indices = list(range(len(source)))
    if subset:
        chosen = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
        indices = sorted(chosen[:subset].tolist())
    mine = [indices[i] for i in ExactShardSampler(len(indices), world_size, rank)]
    if choose_loader(cfg, device) == "dali":
        from conadv.data.dali import DaliEvalLoader

        return DaliEvalLoader(source, mine, batch_size, cfg, device)
    transform = None if cfg.name == "synthetic" else build_eval_transform(cfg)
    dataset = Subset(ViewDataset(source, transform, None, cfg.bad_images, exclude=True), mine)
    return _loader(dataset, range(len(mine)), batch_size, cfg, device.type == "cuda",
                   drop_last=False)


class BatchStream:
    """Endless training batches across epochs, positioned by optimizer step. The loader is a
    DataLoader or the DALI loader: anything iterating the sampler's current epoch in batches.

    The position is global: optimizer step s begins with this rank's micro-batch s x A of the
    run (A = accumulation), whatever the number of ranks, so a checkpoint records only the
    step it was written after, and a job may resume it on another number of ranks or another
    accumulation split of the same global batch (`seek`).
    """

    def __init__(self, loader, sampler: ResumableShardSampler, num_classes: int,
                 accumulation: int = 1) -> None:
        self.loader = loader
        self.sampler = sampler
        self.num_classes = num_classes
        self.accumulation = accumulation
        self.batches_per_epoch = sampler.batches_per_epoch
        self.steps_per_epoch = sampler.steps_per_epoch
        self.epoch = 0
        self.batch_in_epoch = 0
        self._iterator: Any = None

    def next(self) -> tuple[Batch, int]:
        """The next batch and its key: a global batch index that is the same whether the batch
        is drawn by rank r of W or by micro-step r of a 1-rank run accumulating W (it seeds
        per-batch randomness such as attacks)."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._iterator = None
        if self._iterator is None:
            self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.sampler.batch)
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        world, rank = self.sampler.world_size, self.sampler.rank
        key = (self.epoch * self.batches_per_epoch + self.batch_in_epoch) * world + rank
        self.batch_in_epoch += 1
        return batch, key

    def seek(self, step: int) -> None:
        """Continue with the first micro-batch of optimizer step `step`."""
        self.epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        self.batch_in_epoch = step_in_epoch * self.accumulation
        self._iterator = None
