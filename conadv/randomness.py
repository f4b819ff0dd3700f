"""Randomness from identity: every random draw in a run is seeded by what is drawn for (the run
seed and a sample's index, a batch's global key, an evaluation image's index), never by which
rank, DataLoader worker or restart draws it. That is what makes a resume exact on any number
of ranks: a checkpoint saves no generator state, because none is needed.

Identities:
- a sample (run seed, epoch, dataset index): its augmentation (crop, flip, policy);
- an epoch (run seed, epoch): the order of the training set;
- a batch (run seed, global batch key): the attack's random start and target, MixUp/CutMix.
  The key is the batch's index in the run's sequence of per-device batches, the same whether
  rank r of W or micro-step r of a 1-rank job accumulating W draws it
  (`conadv.data.loader.BatchStream.next`);
- an evaluation image (run seed, attack, dataset index): the random start of a robust
  evaluation's attack, the same however the evaluation is sharded.
The formulas are fixed: changing one changes every result of every recipe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_A, _B = 1_000_003, 10_000_019
_MOD = 2**63

MIXING = 1  # a batch's MixUp/CutMix draws


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation in one epoch."""
    return ((seed * _A + epoch) * _B + index) % _MOD


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's permutation of the training set."""
    return (seed * _A + epoch) % _MOD


def batch_seed(seed: int, key: int, purpose: int) -> int:
    """Seed of one batch's draws of one kind (`purpose`, e.g. MIXING)."""
    return ((seed * _A + purpose) * _B + key) % _MOD


def attack_seed(seed: int, key: int) -> int:
    """Seed of the training attack on the batch with this global key."""
    return (seed * _A + key) % _MOD


def evaluation_attack_seed(seed: int, attack: int, index: int) -> int:
    """Seed of evaluation attack number `attack` on the image with this dataset index."""
    return ((seed * 31 + attack) * _A + index) % _MOD


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the process's CPU generator seeded by `seed`, and restore it after
    (so the block's draws neither depend on nor disturb anything else). CUDA's generators are
    left alone: torch.manual_seed would also seed every CUDA device, and where CUDA is not
    initialised it formats a stack trace on every call, milliseconds per sample."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
