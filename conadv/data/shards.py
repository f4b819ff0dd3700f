"""Packed shards: an image folder as a few large tar files plus an index, for file systems where
a million small files are slow to list and open.

Format (chosen over MosaicML's MDS and litdata because it needs no extra package and any tool
reads it): plain POSIX tar files, `<split>-00000.tar`, ..., holding the encoded images as they
were (`<key>.<ext>`, webdataset's naming), and `<split>.index.json` with the class names, the
shards (name, size, SHA-256) and, per sample in the image folder's order, (shard, byte offset
of the member's data, size, label, CRC-32 of the data). The sampler's indices therefore
address the same images as the folder's: random access is one `pread`, and training on shards
equals training on the folder (bit for bit on the CPU: the same bytes reach the same decoder).
Every read checks its sample's CRC-32 (microseconds per image, where hashing whole shards in
every process would not scale), so a corrupt sample is an unreadable image under
data.bad_images, never silently decoded garbage.

Packing verifies that every image decodes, writes every file under a temporary name and renames
it when complete, so an interrupted `conadv-pack` can simply be run again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import zlib
from pathlib import Path

import torch

from conadv.config import DEFAULT_MAX_PIXELS
from conadv.data.decode import decode_rgb
from conadv.data.sources import ImageFolderSource, ImageSource, class_folders
from conadv.errors import DataError
from conadv.fileio import file_sha256, is_count

log = logging.getLogger(__name__)

INDEX_FORMAT = 2  # 1: no per-sample CRC-32 (still read, unchecked)


def index_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}.index.json"


def pack_split(source: ImageFolderSource, out: Path, split: str,
               shard_bytes: int = 1 << 30, skip_unreadable: bool = False) -> dict:
    """Write `source` as shards of about `shard_bytes` each plus its index; returns the index.
    An image that does not decode stops the packing, or with `skip_unreadable` is left out
    and listed in the index (`skipped`): the shards then hold fewer samples than the folder,
    so their indices are no longer the folder's."""
    skipped: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    samples: list[list[int]] = []
    handle: tarfile.TarFile | None = None
    current: Path | None = None

    def close_shard() -> None:
        nonlocal handle
        if handle is None:
            return
        handle.close()
        final = out / current.name.removesuffix(".tmp")
        os.replace(current, final)
        shards.append({"name": final.name, "bytes": final.stat().st_size,
                       "sha256": file_sha256(final)})
        handle = None

    for index in range(len(source)):
        path = Path(source.describe(index))
        data = path.read_bytes()
        try:
            decode_rgb(data, source.max_pixels)
        except Exception as err:  # UnreadableImage, OSError
            if skip_unreadable:
                log.warning("leaving out %s: it does not decode (%s)", path, err)
                skipped.append(str(path))
                continue
            raise DataError(f"cannot pack {path}: it does not decode ({err}); fix or remove "
                            "it, or leave such files out with --skip-unreadable") from None
        if handle is None or handle.offset >= shard_bytes:
            close_shard()
            current = out / f"{split}-{len(shards):05d}.tar.tmp"
            handle = tarfile.open(current, "w", format=tarfile.PAX_FORMAT)
        member = tarfile.TarInfo(f"{len(samples):09d}{path.suffix.lower()}")
        member.size = len(data)
        handle.addfile(member, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        data_offset = handle.offset - padded  # the member's data follows its header
        samples.append([len(shards), data_offset, len(data), source.label(index),
                        zlib.crc32(data)])
    close_shard()
    index = {"format": INDEX_FORMAT, "split": split, "classes": source.classes,
             "shards": shards, "samples": samples, "skipped": skipped}
    tmp = index_path(out, split).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path(out, split))
    return index


def pack_image_folder(root: Path, out: Path, shard_bytes: int = 1 << 30,
                      val_labels: str | None = None, skip_unreadable: bool = False,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, dict]:
    """`conadv-pack`: root/train and root/val (class folders, or a flat val with a labels file)
    into shards under `out`."""
    if Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"the output {out} is a file; give a directory for the shards")
    for split in ("train", "val"):  # both checked before anything is written
        if not (Path(root) / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder; conadv-pack packs an image folder "
                            "with train/ and val/")
    classes = class_folders(Path(root) / "train")
    sources = {split: ImageFolderSource(Path(root) / split, classes,
                                        val_labels if split == "val" else None, max_pixels)
               for split in ("train", "val")}
    packed = {}
    for split, source in sources.items():
        packed[split] = pack_split(source, Path(out), split, shard_bytes, skip_unreadable)
        log.info("packed %s: %d images in %d shards", split, len(packed[split]["samples"]),
                 len(packed[split]["shards"]))
    return packed


def _index_problem(index: object) -> str | None:
    """What an index lacks of what `pack_split` writes, or None. Shard names must be plain
    file names in the shard folder: an index is data, and `../../x` would read outside it. One
    pass over the samples (about a second for ImageNet's 1.28 million) at start-up."""
    if not isinstance(index, dict):
        return "it is not a mapping"
    classes, shards, samples = index.get("classes"), index.get("shards"), index.get("samples")
    if not isinstance(classes, list) or not classes or not all(
            isinstance(c, str) for c in classes):
        return "its classes are not a list of names"
    if not isinstance(shards, list) or not all(
            isinstance(shard, dict) and isinstance(shard.get("name"), str)
            and shard["name"] not in ("", ".", "..") and Path(shard["name"]).name == shard["name"]
            and is_count(shard.get("bytes")) for shard in shards):
        return "its shards are not files of the shard folder with their sizes"
    if not isinstance(samples, list):
        return "its samples are not a list"
    for number, sample in enumerate(samples):
        if not (isinstance(sample, list) and len(sample) in (4, 5) and all(map(is_count, sample))
                and sample[0] < len(shards) and sample[3] < len(classes)
                and sample[1] + sample[2] <= shards[sample[0]]["bytes"]):
            return (f"sample {number} is not (shard, offset, size, label[, checksum]) within "
                    "its shard and classes")
    return None


class ShardSource(ImageSource):
    """Images of one split of a packed dataset, by the folder's sample index. Shards are opened
    lazily in each process (DataLoader workers included); a missing or truncated shard is named
    in one sentence when first opened."""

    def __init__(self, root: str | Path, split: str,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels
        path = index_path(self.root, split)
        try:
            index = json.loads(path.read_text())
        except OSError:
            raise DataError(f"{path} does not exist; pack the image folder first with "
                            f"conadv-pack IMAGE_FOLDER {self.root}") from None
        except ValueError as err:
            raise DataError(f"{path} is not a shard index ({err})") from None
        why = _index_problem(index)
        if why:
            raise DataError(f"{path} is not a shard index conadv-pack wrote: {why}; pack the "
                            "dataset again")
        self.classes = index["classes"]
        self.num_classes = len(self.classes)
        self.shards = index["shards"]
        self.samples = index["samples"]
        self._files: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _descriptor(self, shard: int) -> int:
        if shard not in self._files:
            meta = self.shards[shard]
            path = self.root / meta["name"]
            try:
                size = path.stat().st_size
            except OSError:
                raise DataError(f"shard {path} is missing") from None
            if size != meta["bytes"]:
                raise DataError(f"shard {path} is corrupt: {size} bytes where the index says "
                                f"{meta['bytes']}; pack the dataset again")
            self._files[shard] = os.open(path, os.O_RDONLY)
        return self._files[shard]

    def read_bytes(self, index: int) -> bytes:
        shard, offset, size, _, *crc = self.samples[index]
        data = os.pread(self._descriptor(shard), size, offset)
        if len(data) != size:
            raise DataError(f"shard {self.root / self.shards[shard]['name']} is corrupt: "
                            f"sample {index} is cut short")
        if crc and zlib.crc32(data) != crc[0]:
            raise DataError(f"shard {self.root / self.shards[shard]['name']} is corrupt: "
                            f"sample {index} does not match its checksum")
        return data

    def load(self, index: int) -> torch.Tensor:
        return decode_rgb(self.read_bytes(index), self.max_pixels)

    def label(self, index: int) -> int:
        return self.samples[index][3]

    def describe(self, index: int) -> str:
        shard = self.samples[index][0]
        return f"sample {index} of shard {self.root / self.shards[shard]['name']}"

    def __getstate__(self) -> dict:  # DataLoader workers open their own descriptors
        state = dict(self.__dict__)
        state["_files"] = {}
        return state
