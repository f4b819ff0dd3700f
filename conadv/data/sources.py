"""Image sources: each gives uint8 CHW images and integer labels by index, nothing more.
Augmentation, bad-file policy and batching live elsewhere."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from conadv.errors import DataError


class ImageSource:
    """Interface of an image source."""

    num_classes: int

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> torch.Tensor:
        """uint8 tensor [3, H, W]; raises an exception for an unreadable file."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """What to name in an error about this sample (a path for files)."""
        return f"sample {index}"


class ImageFolderSource(ImageSource):
    """ImageNet layout: root/<class>/<image>. Decoded by torchvision's decoder (libjpeg-turbo
    for JPEG), which is faster than the PIL path of torchvision's ImageFolder."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset directory {root} does not exist")
        try:
            classes, class_to_idx = find_classes(str(root))
            self.samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, OSError) as err:
            raise DataError(f"dataset directory {root} has no usable images: {err}") from None
        if not self.samples:
            raise DataError(f"dataset directory {root} is empty")
        self.classes = classes
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        return decode_image(read_file(self.samples[index][0]), mode=ImageReadMode.RGB)

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def describe(self, index: int) -> str:
        return self.samples[index][0]


class SyntheticSource(ImageSource):
    """uint8 noise at the training size, labels index mod classes: for benchmarks, where the
    data path must cost (almost) nothing. Deterministic per index."""

    def __init__(self, num_samples: int, num_classes: int, image_size: int) -> None:
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.image_size = image_size

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(index)
        size = (3, self.image_size, self.image_size)
        return torch.randint(0, 256, size, dtype=torch.uint8, generator=gen)

    def label(self, index: int) -> int:
        return index % self.num_classes


class DigitsSource(ImageSource):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), upscaled to
    32x32 RGB, with a fixed stratified 80/20 train/test split. Ships inside scikit-learn, so the
    demo needs no download."""

    SIZE = 32
    TEST_FRACTION = 0.2
    SPLIT_SEED = 0

    def __init__(self, split: str) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"digits split must be train or test, got {split}")
        self.split = split
        self.num_classes = 10

    @cached_property
    def _arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        pixels = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
        big = torch.nn.functional.interpolate(pixels, size=(self.SIZE, self.SIZE),
                                              mode="bilinear", align_corners=False)
        images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        indices = np.arange(len(digits.target))
        train_idx, test_idx = train_test_split(indices, test_size=self.TEST_FRACTION,
                                               stratify=digits.target,
                                               random_state=self.SPLIT_SEED)
        chosen = np.sort(train_idx if self.split == "train" else test_idx)
        labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
        return images[torch.from_numpy(chosen)].contiguous(), labels

    def __len__(self) -> int:
        return len(self._arrays[1])

    def load(self, index: int) -> torch.Tensor:
        return self._arrays[0][index]

    def label(self, index: int) -> int:
        return int(self._arrays[1][index])
