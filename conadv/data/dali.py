"""NVIDIA DALI for training and evaluation (data.loader=dali, or auto on a GPU): DALI decodes
and crops (nvJPEG on a GPU with device "mixed", DALI's CPU operators without one), everything
else is conadv's.

The project's sampler still decides which images, in which order, with which per-sample seed.
Every random decision is drawn by the very torchvision transforms the torchvision path runs,
under the sample's seed and in the same order: the RandomResizedCrop box (`make_params`, from
the image size in the file's header), the flip's coin, then the augmentation policy's draws
(AutoAugment's ImageNet policy, RandAugment, TrivialAugment). DALI gets the encoded bytes,
boxes and flips through `external_source` and returns the crops; the policy then runs on them
per sample, on the device (torchvision's v2 policies run on CUDA tensors), replaying the
sample's draws. Measured against DALI's own automatic augmentations: those draw their random
numbers inside the pipeline, so the same sample would get other operations on another layout
or after a resume; replaying torchvision's draws keeps the policy the published one (the same
code) and resume exact, at the cost of a per-sample Python loop of a few GPU kernels.
Evaluation resizes the whole image to the size torchvision's Resize gives it and cuts the
centre crop at the integer offsets torchvision's CenterCrop uses (both computed on the host
with torchvision's own rounding), so both paths see the same region.

Images are read as stored: torchvision ignores EXIF orientation, and so does the decoder here.
Unreadable files are screened on the host before DALI sees them (a header that parses, and a
JPEG's end marker or a PNG's IEND chunk, which a truncated file lacks); a file that still
fails inside DALI is found by decoding the batch's files one by one on the host, and the
pipeline is rebuilt. Under data.bad_images=skip a training file is replaced by the next
readable one and counted, an evaluation file is left out and counted, as on every backend.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import encode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size

from conadv.config import DataConfig
from conadv.data.dataset import MAX_CONSECUTIVE_BAD, unreadable
from conadv.data.decode import check_decodable, decode_rgb
from conadv.data.sources import ImageSource
from conadv.data.transforms import build_policy
from conadv.errors import ConfigError, DataError
from conadv.randomness import seeded
from conadv.streams import streams_for

log = logging.getLogger(__name__)


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ConfigError("data.loader=dali needs NVIDIA DALI, which is not installed: "
                          "pip install '.[dali]' (nvidia-dali-cuda130), or use "
                          "data.loader=torchvision") from None
    import nvidia.dali as dali

    return dali


def dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def draw_crop_and_flip(height: int, width: int, crop: v2.RandomResizedCrop,
                       hflip: bool) -> tuple[dict, bool]:
    """The draws of the torchvision path's RandomResizedCrop and flip, from the current
    generator (call under the sample's seed)."""
    box = crop.make_params([torch.empty((3, height, width), dtype=torch.uint8)])
    flip = hflip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5)'s coin
    return box, flip


def crop_and_flip(seed: int, height: int, width: int, crop: v2.RandomResizedCrop,
                  hflip: bool) -> tuple[dict, bool]:
    """The RandomResizedCrop box and the flip that the torchvision path draws for this sample
    (the same transform objects, the same order of draws, under the sample's seed)."""
    with seeded(seed):
        return draw_crop_and_flip(height, width, crop, hflip)


def evaluation_box(height: int, width: int, resize: int, size: int) -> dict:
    """torchvision's Resize(resize) + CenterCrop(size) of one image: the resized size and the
    crop's integer offsets in it, with torchvision's own rounding."""
    new_h, new_w = _compute_resized_output_size((height, width), [resize])
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return {"top": top, "left": left, "height": new_h, "width": new_w}


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header, if the file looks complete; raises otherwise."""
    if not data:
        raise ValueError("the file is empty")
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        kind = image.format
    if kind == "JPEG" and b"\xff\xd9" not in data[-1024:]:
        raise ValueError("the JPEG has no end marker (truncated)")
    if kind == "PNG" and b"IEND" not in data[-64:]:
        raise ValueError("the PNG has no IEND chunk (truncated)")
    return height, width


_PLACEHOLDER = encode_jpeg(torch.full((3, 8, 8), 128, dtype=torch.uint8)).numpy().tobytes()


class _Decoder:
    """One DALI pipeline. Training ("crop"): decode a box of each encoded image, resize it to
    size x size, flip it or not. Evaluation ("centre"): decode the whole image, resize it to
    the size torchvision's Resize gives it, cut the centre crop at the same integer offsets.
    Its output is copied out of DALI's buffers (which the next run reuses): on a stream of its
    own where the device has streams, the batch then carrying the event that marks it written
    (batch['ready']), which every consumer waits for."""

    def __init__(self, size: int, max_batch: int, threads: int, device: torch.device,
                 mode: str = "crop") -> None:
        self.dali = require_dali()
        self.size, self.max_batch, self.threads, self.mode = size, max_batch, threads, mode
        self.device = device
        self.pipe = self._build()
        self.streams = streams_for(device)
        self.copy_stream = self.streams.new_stream() if self.streams is not None else None
        self._cloned: Any = None  # the event of the last clone out of DALI's buffers

    def _build(self):
        dali, fn, types = self.dali, self.dali.fn, self.dali.types
        mixed = self.device.type == "cuda"

        @dali.pipeline_def(batch_size=self.max_batch, num_threads=self.threads,
                           device_id=self.device.index if mixed else None,
                           prefetch_queue_depth=1, exec_dynamic=True)
        def crops():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            anchors = fn.external_source(name="anchors", dtype=types.FLOAT)
            shapes = fn.external_source(name="shapes", dtype=types.FLOAT)
            flips = fn.external_source(name="flips", dtype=types.INT32)
            decode = "mixed" if mixed else "cpu"
            # adjust_orientation=False: torchvision's decoder ignores EXIF orientation, and the
            # boxes are drawn from the stored (unrotated) size
            if self.mode == "crop":
                images = fn.decoders.image_slice(encoded, anchors, shapes, device=decode,
                                                 output_type=types.RGB, normalized_anchor=False,
                                                 normalized_shape=False,
                                                 adjust_orientation=False)
                images = fn.resize(images, resize_x=self.size, resize_y=self.size,
                                   antialias=True, interp_type=types.INTERP_LINEAR)
            else:  # shapes: the resized (height, width); anchors: the crop's (left, top)
                images = fn.decoders.image(encoded, device=decode, output_type=types.RGB,
                                           adjust_orientation=False)
                images = fn.resize(images, size=shapes, antialias=True,
                                   interp_type=types.INTERP_LINEAR)
                crop = types.Constant(np.array([self.size, self.size], np.float32))
                images = fn.slice(images, anchors, crop, normalized_anchor=False,
                                  normalized_shape=False, axis_names="WH")
            return fn.transpose(fn.flip(images, horizontal=flips), perm=[2, 0, 1])

        pipe = crops()
        pipe.build()
        return pipe

    def run(self, encoded: list[bytes], boxes: list[dict], flips: list[bool],
            after: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The crops as uint8 [B, 3, size, size] on the device; `after(crops)` runs on the
        same stream and returns the batch's image tensors (views of the crops). Raises
        RuntimeError when DALI fails on some file."""
        for name, values in (
                ("encoded", [np.frombuffer(data, dtype=np.uint8) for data in encoded]),
                ("anchors", [np.array([b["left"], b["top"]], np.float32) for b in boxes]),
                # image_slice reads (x, y) extents; resize's `size` is in layout order (H, W)
                ("shapes", [np.array([b["width"], b["height"]] if self.mode == "crop" else
                                     [b["height"], b["width"]], np.float32) for b in boxes]),
                ("flips", [np.array(int(f), np.int32) for f in flips])):
            self.pipe.feed_input(name, values)
        if self._cloned is not None:
            self._cloned.synchronize()  # the previous clone has read DALI's buffers
        try:
            (images,) = self.pipe.run()  # returns once the batch is ready
        except Exception:
            self.pipe = self._build()  # a pipeline that raised is not reused
            raise
        decoded = torch.from_dlpack(images.as_tensor())
        if self.streams is None:
            return after(decoded.clone())
        with self.streams.use(self.copy_stream):
            crops = decoded.clone()
            self._cloned = self.streams.new_event()  # DALI's buffers are free from here
            self._cloned.record(self.copy_stream)
            views = after(crops)  # the policy's kernels need not hold up the next decode
            ready = self.streams.new_event()
            ready.record(self.copy_stream)
        return {**views, "ready": ready}


class _Reader:
    """Encoded files of a source, screened, with the unreadable-file policy."""

    def __init__(self, source: ImageSource, bad_images: str) -> None:
        if not hasattr(source, "read_bytes"):
            raise ConfigError("data.loader=dali reads image files: use data.name=imagefolder "
                              "or shards")
        self.source = source
        self.bad_images = bad_images

    def read(self, index: int) -> tuple[bytes, tuple[int, int]]:
        """(bytes, (height, width)); raises for an unreadable file: one that fails the quick
        screen and the host's decoder too (a JPEG with data after its end marker passes
        torchvision, so it is not skipped here either)."""
        data = self.source.read_bytes(index)
        check_decodable(data, self.source.max_pixels)  # what could crash a decoder, DALI's too
        try:
            return data, image_size(data)
        except ValueError:
            if not _decodes(data, self.source.max_pixels):
                raise
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return data, (height, width)

    def unreadable(self, index: int, err: Exception) -> None:
        unreadable(self.source, index, err, self.bad_images)

    def decodes_on_the_host(self, index: int) -> bool:
        try:
            return _decodes(self.source.read_bytes(index), self.source.max_pixels)
        except OSError:
            return False


def _decodes(data: bytes, max_pixels: int) -> bool:
    """Whether the torchvision path's decoder reads the file."""
    try:
        decode_rgb(data, max_pixels)
        return True
    except Exception:  # noqa: BLE001 (decoders raise RuntimeError, ValueError...)
        return False


class DaliTrainLoader:
    """Iterates the sampler's current epoch in batches, as the DataLoader it replaces: dicts of
    uint8 images [B, 3, S, S] (on the GPU with device 'mixed'), the augmented view when
    data.second_view, labels, indices of the samples served and n_bad."""

    def __init__(self, source: ImageSource, sampler, cfg: DataConfig,
                 device: torch.device) -> None:
        self.reader = _Reader(source, cfg.bad_images)
        self.source, self.sampler, self.batch = source, sampler, sampler.batch
        self.crop = v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_scale, 1.0),
                                         antialias=True)
        self.hflip = cfg.hflip
        self.policy = build_policy(cfg.augment)
        self.second_view = cfg.second_view
        self.decoder = _Decoder(cfg.image_size, self.batch, max(1, cfg.workers), device)
        self._known_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pending: list[tuple[int, int]] = []
        for item in self.sampler:
            pending.append(item)
            if len(pending) == self.batch:
                yield self._batch(pending)
                pending = []

    def _readable(self, index: int) -> tuple[int, bytes, tuple[int, int], int]:
        """The sample served for `index` (the next readable one under skip), its bytes and
        size, and how many unreadable files were passed over."""
        for n_bad in range(MAX_CONSECUTIVE_BAD):
            current = (index + n_bad) % len(self.source)
            try:
                if current in self._known_bad:
                    raise ValueError("DALI could not decode it")
                data, size = self.reader.read(current)
                return current, data, size, n_bad
            except Exception as err:  # noqa: BLE001 (PIL and OS errors alike)
                self.reader.unreadable(current, err)
        raise DataError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images starting at "
                        f"{self.source.describe(index)}; the dataset looks corrupt")

    def _batch(self, samples: list[tuple[int, int]]) -> dict[str, Any]:
        for _ in range(MAX_CONSECUTIVE_BAD):
            served = [self._readable(index) for index, _ in samples]
            boxes, flips = [], []
            for (_, seed), (_, _, (height, width), _) in zip(samples, served):
                box, flip = crop_and_flip(seed, height, width, self.crop, self.hflip)
                boxes.append(box)
                flips.append(flip)
            try:
                images = self.decoder.run([data for _, data, _, _ in served], boxes, flips,
                                          functools.partial(self._views, samples=samples,
                                                            served=served))
            except RuntimeError as err:
                self._find_what_dali_cannot_decode([index for index, *_ in served], err)
                continue
            return {**images,
                    "label": torch.tensor([self.source.label(i) for i, *_ in served]),
                    "n_bad": torch.tensor([n for *_, n in served], dtype=torch.long),
                    "index": torch.tensor([i for i, *_ in served])}
        raise DataError("DALI keeps failing on this batch's files; use data.loader=torchvision")

    def _find_what_dali_cannot_decode(self, indices: Sequence[int], err: Exception) -> None:
        bad = [i for i in indices if not self.reader.decodes_on_the_host(i)]
        if not bad:
            raise DataError(f"DALI failed on a batch whose files all decode on the host "
                            f"({str(err).splitlines()[0][:200]})") from None
        self._known_bad.update(bad)

    def _views(self, crops: torch.Tensor, samples: list[tuple[int, int]],
               served: list) -> dict[str, torch.Tensor]:
        """The crops, and the policy applied to each under its sample's seed, after replaying
        the crop and flip draws (the order of draws of the torchvision path)."""
        if self.policy is None:
            return {"image": crops}
        augmented = []
        for crop, (_, seed), (_, _, (height, width), _) in zip(crops, samples, served):
            with seeded(seed):
                draw_crop_and_flip(height, width, self.crop, self.hflip)
                augmented.append(self.policy(crop))
        augmented = torch.stack(augmented)
        return {"image": crops, "aug_image": augmented} if self.second_view else (
            {"image": augmented})


class DaliEvalLoader:
    """Exact evaluation batches of `indices` (each readable image once): resize of the
    shorter side and centre crop as the torchvision path, an unreadable file's slot a
    placeholder with valid=0 (left out and counted by evaluation, never replaced)."""

    def __init__(self, source: ImageSource, indices: Sequence[int], batch_size: int,
                 cfg: DataConfig, device: torch.device) -> None:
        self.reader = _Reader(source, cfg.bad_images)
        self.source, self.indices, self.batch_size = source, list(indices), batch_size
        self.resize, self.size = cfg.eval_resize, cfg.eval_crop
        self.decoder = _Decoder(self.size, batch_size, max(1, cfg.workers), device, "centre")

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self._batch(self.indices[start:start + self.batch_size])

    def _item(self, index: int, known_bad: set[int]) -> tuple[bytes, dict, int]:
        try:
            if index in known_bad:
                raise ValueError("DALI could not decode it")
            data, (height, width) = self.reader.read(index)
            return data, evaluation_box(height, width, self.resize, self.size), 1
        except Exception as err:  # noqa: BLE001
            self.reader.unreadable(index, err)
            return _PLACEHOLDER, {"top": 0, "left": 0, "height": self.size,
                                  "width": self.size}, 0

    def _batch(self, indices: list[int]) -> dict[str, Any]:
        known_bad: set[int] = set()
        while True:
            items = [self._item(i, known_bad) for i in indices]
            try:
                images = self.decoder.run([d for d, _, _ in items], [b for _, b, _ in items],
                                          [False] * len(items), lambda c: {"image": c})
                break
            except RuntimeError as err:
                bad = {i for i, (_, _, ok) in zip(indices, items)
                       if ok and not self.reader.decodes_on_the_host(i)}
                if not bad:
                    raise DataError(f"DALI failed on a batch whose files all decode on the host "
                                    f"({str(err).splitlines()[0][:200]})") from None
                known_bad |= bad
        valid = torch.tensor([ok for _, _, ok in items])
        return {**images, "label": torch.tensor([self.source.label(i) for i in indices]),
                "n_bad": 1 - valid, "index": torch.tensor(indices), "valid": valid}
