"""Turns an image source into training/eval samples: transforms under a per-sample seed, an
optional second (augmented) view, and the unreadable-file policy."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from conadv.data.sources import ImageSource
from conadv.data.transforms import Transform
from conadv.errors import DataError
from conadv.randomness import seeded

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 32


def unreadable(source: ImageSource, index: int, err: Exception, policy: str) -> None:
    """data.bad_images for an image that does not decode, on every backend: `fail` raises
    one sentence naming the file, `skip` logs it (the caller replaces or leaves it out)."""
    name = source.describe(index)
    if policy == "fail":
        raise DataError(f"cannot read image {name} ({type(err).__name__}: {err}); "
                        "fix or remove it, or set data.bad_images=skip") from None
    log.warning("skipping unreadable image %s: %s", name, err)


class ViewDataset(Dataset):
    """Items are dicts {image, label, n_bad, index[, aug_image][, valid]} with uint8 images
    (index: the sample actually served, which differs from the key when an unreadable file was
    skipped).

    Keys are an index or (index, seed). With a seed the transforms run under that seed in a
    forked RNG, so augmentation does not depend on worker count, rank or restarts and never
    disturbs the caller's RNG.

    Unreadable files: policy `fail` raises a DataError naming the file; `skip` logs the file and,
    for training, serves the next readable sample instead (batch shapes stay fixed, which DDP
    and the ConAdv queue rely on) and counts it in `n_bad`. For evaluation (`exclude=True`) an
    unreadable file is never replaced, which would count another image twice: its item is a
    blank placeholder with valid=0, which evaluation leaves out and counts.
    """

    def __init__(self, source: ImageSource, transform: Transform | None,
                 aug_transform: Transform | None = None, bad_images: str = "fail",
                 exclude: bool = False) -> None:
        self.source = source
        self.transform = transform
        self.aug_transform = aug_transform
        self.bad_images = bad_images
        self.exclude = exclude

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self.exclude:
            return self._evaluation_item(index)
        image, index, n_bad = self._load_readable(index)
        if seed is None:
            views = self._views(image)
        else:
            with seeded(seed):
                views = self._views(image)
        item: dict[str, torch.Tensor | int] = {"image": views[0],
                                               "label": self.source.label(index),
                                               "n_bad": n_bad, "index": index}
        if len(views) > 1:
            item["aug_image"] = views[1]
        return item

    def _evaluation_item(self, index: int) -> dict[str, torch.Tensor | int]:
        try:
            image, valid = self.source.load(index), 1
        except Exception as err:  # decoders raise RuntimeError, OSError, ValueError...
            self._unreadable(index, err)
            image, valid = torch.zeros(3, 8, 8, dtype=torch.uint8), 0  # resized below
        image = self.transform(image) if self.transform is not None else image
        return {"image": image, "label": self.source.label(index), "n_bad": 1 - valid,
                "index": index, "valid": valid}

    def _unreadable(self, index: int, err: Exception) -> None:
        unreadable(self.source, index, err, self.bad_images)

    def _views(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        clean = self.transform(image) if self.transform is not None else image
        if self.aug_transform is None:
            return (clean,)
        return clean, self.aug_transform(clean)

    def _load_readable(self, index: int) -> tuple[torch.Tensor, int, int]:
        for n_bad in range(MAX_CONSECUTIVE_BAD):
            current = (index + n_bad) % len(self.source)
            try:
                return self.source.load(current), current, n_bad
            except Exception as err:  # decoders raise RuntimeError, OSError, ValueError...
                self._unreadable(current, err)
        raise DataError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images starting at "
                        f"{self.source.describe(index)}; the dataset looks corrupt")
