"""Samplers: a resumable, batch-chunked training sampler and an exact evaluation sharder."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from conadv.randomness import epoch_seed, sample_seed


class ResumableShardSampler(Sampler[tuple[int, int]]):
    """Training sampler: one permutation per epoch (seeded by seed and epoch), cut into chunks of
    `per_device_batch`; rank r takes chunks r, r+W, r+2W, ...

    Chunking by batch (rather than striding by sample) means the images of one optimizer step
    are the same set whether the global batch is split over ranks or over accumulation
    micro-steps, so a 2-rank run and a 1-rank run with accumulation 2 see identical data.
    The tail that does not fill a whole optimizer step (per_device x W x accumulation images)
    is dropped, so an epoch has the same number of steps on every layout of the global batch.
    Yields (dataset index, per-sample augmentation seed).
    """

    def __init__(self, dataset_size: int, world_size: int, rank: int, per_device_batch: int,
                 seed: int, shuffle: bool = True, accumulation: int = 1) -> None:
        self.dataset_size = dataset_size
        self.world_size = world_size
        self.rank = rank
        self.batch = per_device_batch
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = dataset_size // (per_device_batch * world_size * accumulation)
        self.batches_per_epoch = self.steps_per_epoch * accumulation
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Begin `epoch`, skipping the first `start` samples of this rank (mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    def rank_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(self.dataset_size, generator=gen).tolist()
        else:
            order = list(range(self.dataset_size))
        mine: list[int] = []
        for chunk in range(self.rank, self.batches_per_epoch * self.world_size, self.world_size):
            mine.extend(order[chunk * self.batch:(chunk + 1) * self.batch])
        return mine

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.rank_indices(self.epoch)[self.start:]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch - self.start


class ExactShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r+W, ... with no padding, so summing counts
    over ranks counts every sample exactly once (ranks may differ by one sample)."""

    def __init__(self, dataset_size: int, world_size: int, rank: int) -> None:
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
