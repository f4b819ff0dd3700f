"""NVIDIA DALI for the training view (data.loader=dali): decoding and cropping by DALI (nvJPEG
on a GPU with device "mixed", DALI's CPU operators without one), everything else conadv's.

The project's sampler still decides which images, in which order, with which per-sample seed;
the RandomResizedCrop box and the flip are drawn under that seed by the very transforms the
torchvision path runs (`make_params`, then the flip's coin), from the image size in the JPEG
header. DALI gets the encoded bytes, boxes and flips through `external_source` and returns the
crops. So exact resume, world-size independence and exact evaluation hold as on the
torchvision path, and the images agree with it up to the decoders' and resamplers' rounding
(tested: mean absolute difference <= 2/255). AutoAugment/RandAugment views and evaluation stay
on the torchvision path (set data.augment=none with DALI).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from conadv.config import DataConfig
from conadv.data.sampler import ResumableShardSampler
from conadv.data.sources import ImageSource
from conadv.errors import ConfigError, DataError
from conadv.randomness import seeded
from conadv.streams import streams_for


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ConfigError("data.loader=dali needs NVIDIA DALI, which is not installed: "
                          "pip install '.[dali]' (nvidia-dali-cuda130), or use "
                          "data.loader=torchvision") from None
    import nvidia.dali as dali

    return dali


def crop_and_flip(seed: int, height: int, width: int, crop: v2.RandomResizedCrop,
                  hflip: bool) -> tuple[dict, bool]:
    """The RandomResizedCrop box and the flip that the torchvision path draws for this sample
    (the same transform objects, the same order of draws, under the sample's seed)."""
    with seeded(seed):
        box = crop.make_params([torch.empty((3, height, width), dtype=torch.uint8)])
        flip = hflip and bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5)'s coin
    return box, flip


class DaliTrainLoader:
    """Iterates the sampler's current epoch in batches, as the DataLoader it replaces: dicts of
    uint8 images [B, 3, S, S] (on the GPU with device 'mixed'), labels, indices and n_bad."""

    def __init__(self, source: ImageSource, sampler: ResumableShardSampler, cfg: DataConfig,
                 device: torch.device) -> None:
        dali = require_dali()
        if not hasattr(source, "read_bytes"):
            raise ConfigError("data.loader=dali reads image files: use data.name=imagefolder "
                              "or shards")
        self.source, self.sampler, self.batch = source, sampler, sampler.batch
        self.crop = v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_scale, 1.0),
                                         antialias=True)
        self.hflip = cfg.hflip
        mixed = device.type == "cuda"
        self.pipe = self._pipeline(dali, cfg.image_size, max(1, cfg.workers),
                                   device.index if mixed else None, "mixed" if mixed else "cpu")
        # Where the device has streams, the batch is copied out of DALI's buffers on a stream of
        # its own and carries the event that marks it written (batch["ready"]): its consumers
        # (the main stream, the attack's side stream) wait for that event, not for each other.
        self.streams = streams_for(device)
        self.copy_stream = self.streams.new_stream() if self.streams is not None else None
        self._copied = None  # the event of the last copy: DALI reuses its buffers next run

    def _pipeline(self, dali, size: int, threads: int, device_id: int | None, decode: str):
        fn, types = dali.fn, dali.types

        @dali.pipeline_def(batch_size=self.batch, num_threads=threads, device_id=device_id,
                           prefetch_queue_depth=1, exec_dynamic=True)
        def crops():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            anchors = fn.external_source(name="anchors", dtype=types.FLOAT)
            shapes = fn.external_source(name="shapes", dtype=types.FLOAT)
            flips = fn.external_source(name="flips", dtype=types.INT32)
            # adjust_orientation=False: torchvision's decoder ignores EXIF orientation, and the
            # crop box is drawn from the stored (unrotated) size
            images = fn.decoders.image_slice(jpegs, anchors, shapes, device=decode,
                                             output_type=types.RGB, normalized_anchor=False,
                                             normalized_shape=False, adjust_orientation=False)
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=True,
                               interp_type=types.INTERP_LINEAR)
            return fn.transpose(fn.flip(images, horizontal=flips), perm=[2, 0, 1])

        pipe = crops()
        pipe.build()
        return pipe

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pending: list[tuple[int, int]] = []
        for item in self.sampler:
            pending.append(item)
            if len(pending) == self.batch:
                yield self._run(pending)
                pending = []

    def _run(self, samples: list[tuple[int, int]]) -> dict[str, Any]:
        encoded, anchors, shapes, flips = [], [], [], []
        for index, seed in samples:
            data = self.source.read_bytes(index)
            try:
                width, height = Image.open(io.BytesIO(data)).size  # the header only
            except Exception as err:
                raise DataError(f"cannot read image {self.source.describe(index)} ({err}); "
                                "data.loader=dali needs readable data: fix or remove it, or "
                                "use data.loader=torchvision with data.bad_images=skip") from None
            box, flip = crop_and_flip(seed, height, width, self.crop, self.hflip)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            anchors.append(np.array([box["left"], box["top"]], dtype=np.float32))
            shapes.append(np.array([box["width"], box["height"]], dtype=np.float32))
            flips.append(np.array(int(flip), dtype=np.int32))
        for name, values in (("jpegs", encoded), ("anchors", anchors), ("shapes", shapes),
                             ("flips", flips)):
            self.pipe.feed_input(name, values)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read DALI's buffers
        (images,) = self.pipe.run()  # returns once the batch is ready
        indices = [index for index, _ in samples]
        batch = {"label": torch.tensor([self.source.label(i) for i in indices]),
                 "n_bad": torch.zeros(len(indices), dtype=torch.long),
                 "index": torch.tensor(indices)}
        decoded = torch.from_dlpack(images.as_tensor())
        if self.streams is None:  # a copy: DALI reuses its output buffers on the next run
            batch["image"] = decoded.clone()
            return batch
        with self.streams.use(self.copy_stream):
            batch["image"] = decoded.clone()
            self._copied = self.streams.new_event()
            self._copied.record(self.copy_stream)
        batch["ready"] = self._copied
        return batch
