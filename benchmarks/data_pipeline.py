"""Input pipeline throughput on real JPEG files, against torchvision's ImageFolder.

Writes ImageNet-like JPEGs first (about 500x375, quality 90, photo-like content: smooth shapes
plus fine texture, ~100 KB each), then measures, in one invocation:
- conadv: torchvision's JPEG decoder (libjpeg-turbo) into a uint8 tensor, RandomResizedCrop 224
  + flip with transforms.v2 on the tensor (conadv.data.ViewDataset + ImageFolderSource);
- baseline: torchvision.datasets.ImageFolder with its default PIL loader and the same
  transforms.v2 on the PIL image, then PILToTensor (so both yield the same uint8 tensor);
each per loader worker (in-process) and with N DataLoader workers, plain and with AutoAugment.
Then the training recipes by backend, each with the host CPU time it costs per image (process
CPU time over images, every thread of the process counted):
- plain: RandomResizedCrop 224 + flip;
- three views: the clean view plus an AutoAugment (ImageNet policy) view of it, as the
  published ConAdv recipe reads them (the adversarial view is made by the trainer);
by the torchvision path (one loader worker, in-process) and by DALI (one thread; CPU operators,
or nvJPEG decode + crop with the policy on the GPU when a CUDA device is present).

    python -m benchmarks.data_pipeline [--images 256] [--workers 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import encode_jpeg
from torchvision.transforms import v2

from benchmarks.common import machine_info, write_json
from conadv.config import DataConfig
from conadv.data.dataset import ViewDataset
from conadv.data.shards import ShardSource, pack_split
from conadv.data.sources import ImageFolderSource
from conadv.data.transforms import build_train_transforms


def photo_like(gen: torch.Generator, height: int, width: int) -> torch.Tensor:
    """Low-frequency colour fields plus texture: compresses like a photograph."""
    coarse = torch.rand(1, 3, height // 32, width // 32, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic",
                                             align_corners=False)[0]
    texture = torch.rand(3, height, width, generator=gen) * 0.25
    return ((smooth * 0.8 + texture).clamp(0, 1) * 255).to(torch.uint8)


def write_jpegs(root: Path, count: int, classes: int = 8) -> float:
    """root/<class>/<n>.jpg; returns the mean file size in KB."""
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = (375, 500) if i % 3 else (500, 375)
        data = encode_jpeg(photo_like(gen, height, width), quality=90).numpy().tobytes()
        (folder / f"{i:05d}.jpg").write_bytes(data)
        sizes.append(len(data))
    return sum(sizes) / len(sizes) / 1024


def conadv_dataset(root: Path, augment: str, source=None) -> ViewDataset:
    cfg = DataConfig(name="imagefolder", root=str(root.parent), augment=augment)
    transform, _ = build_train_transforms(cfg)
    return ViewDataset(source or ImageFolderSource(root), transform)


def baseline_dataset(root: Path, augment: str) -> ImageFolder:
    cfg = DataConfig(name="imagefolder", root=str(root.parent), augment=augment)
    transform, _ = build_train_transforms(cfg)  # the same v2 transforms, applied to PIL
    return ImageFolder(str(root), transform=v2.Compose([transform, v2.PILToTensor()]))


def read_all(dataset, count: int) -> float:
    start = time.perf_counter()
    for index in range(count):
        item = dataset[index]
        image = item["image"] if isinstance(item, dict) else item[0]
        assert image.dtype == torch.uint8 and image.shape[-1] == 224
    return time.perf_counter() - start


def per_worker(datasets: list, count: int, repeats: int) -> list[float]:
    """Images per second of one worker (each dataset read in this process), the candidates
    taking turns so that machine noise hits them alike; the best repeat counts."""
    best = [math.inf] * len(datasets)
    for _ in range(repeats):
        for i, dataset in enumerate(datasets):
            best[i] = min(best[i], read_all(dataset, count))
    return [count / seconds for seconds in best]


def with_workers(dataset, count: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=32, num_workers=workers, shuffle=False)
    iterator = iter(loader)
    next(iterator)  # workers started and warm
    start = time.perf_counter()
    seen = 32
    for batch in iterator:
        seen += len(batch["image"] if isinstance(batch, dict) else batch[0])
    return (seen - 32) / (time.perf_counter() - start)


def dali_per_core(root: Path, images: int, repeats: int, device: torch.device) -> float | None:
    """Images per second of the DALI training loader with one thread (CPU operators; nvJPEG
    'mixed' decoding when `device` is CUDA), RandomResizedCrop 224 + flip; None without DALI."""
    try:
        from conadv.data.dali import DaliTrainLoader
        from conadv.data.sampler import ResumableShardSampler
        from conadv.errors import ConfigError

        cfg = DataConfig(name="imagefolder", root=str(root.parent), workers=1, loader="dali")
        sampler = ResumableShardSampler(images, 1, 0, 32, seed=0)
        loader = DaliTrainLoader(ImageFolderSource(root), sampler, cfg, device)
    except ConfigError:
        return None
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        seen = sum(len(batch["label"]) for batch in loader)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return seen / best


RECIPES = {"plain": {"augment": "none", "second_view": False},
           "three_views": {"augment": "autoaugment", "second_view": True}}


def _timed(batches) -> tuple[int, float, float]:
    """(images, wall seconds, host CPU seconds) of reading the batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    seen = 0
    for batch in batches:
        seen += len(batch["label"])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return seen, time.perf_counter() - wall, time.process_time() - cpu


def recipe_rates(root: Path, images: int, repeats: int, device: torch.device) -> dict:
    """img/s and host CPU ms per image of each recipe by each backend on `device`."""
    from conadv.data.dali import DaliTrainLoader, dali_installed
    from conadv.data.sampler import ResumableShardSampler

    results: dict[str, Any] = {}
    for recipe, views in RECIPES.items():
        cfg = DataConfig(name="imagefolder", root=str(root.parent), workers=1, **views)
        transform, second = build_train_transforms(cfg)
        backends = {"torchvision": DataLoader(
            ViewDataset(ImageFolderSource(root), transform, second), batch_size=32,
            sampler=ResumableShardSampler(images, 1, 0, 32, seed=0), num_workers=0)}
        if dali_installed():
            backends["dali"] = DaliTrainLoader(
                ImageFolderSource(root), ResumableShardSampler(images, 1, 0, 32, seed=0), cfg,
                device)
        for backend, loader in backends.items():
            best = None
            for _ in range(repeats):
                seen, wall, cpu = _timed(loader)
                if best is None or wall < best[1]:
                    best = (seen, wall, cpu)
            seen, wall, cpu = best
            results[f"{recipe}_{backend}"] = {"img_s": seen / wall,
                                              "host_cpu_ms_per_img": 1000 * cpu / seen}
    return results


def run(images: int, workers: int, repeats: int) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker is one thread
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        mean_kb = write_jpegs(root, images)
        pack_split(ImageFolderSource(root), Path(tmp) / "shards", "train")
        for augment in ("none", "autoaugment"):
            ours, base = conadv_dataset(root, augment), baseline_dataset(root, augment)
            shards = conadv_dataset(root, augment, ShardSource(Path(tmp) / "shards", "train"))
            per_ours, per_base, per_shards = per_worker([ours, base, shards], images, repeats)
            many_ours = with_workers(ours, images, workers)
            many_base = with_workers(base, images, workers)
            results[augment] = {
                "conadv_per_worker_img_s": per_ours, "imagefolder_pil_per_worker_img_s": per_base,
                "per_worker_speedup": per_ours / per_base,
                "conadv_shards_per_worker_img_s": per_shards,
                "shards_per_worker_speedup": per_shards / per_base,
                f"conadv_{workers}_workers_img_s": many_ours,
                f"imagefolder_pil_{workers}_workers_img_s": many_base,
                "workers_speedup": many_ours / many_base}
        results["dali_cpu_per_core_img_s"] = dali_per_core(root, images, repeats,
                                                           torch.device("cpu"))
        if torch.cuda.is_available():
            results["dali_mixed_img_s"] = dali_per_core(root, images, repeats,
                                                        torch.device("cuda"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results["recipes"] = recipe_rates(root, images, repeats, device)
    torch.set_num_threads(threads)
    return {"benchmark": "data_pipeline", "images": images, "mean_jpeg_kb": mean_kb,
            "workers": workers, "results": results, "machine": machine_info()}


def print_report(report: dict[str, Any]) -> None:
    print(f"data pipeline: {report['images']} JPEGs (~500x375, q90, {report['mean_jpeg_kb']:.0f}"
          f" KB), RandomResizedCrop 224 + flip")
    for augment, r in report["results"].items():
        if augment == "recipes":
            print("  recipes (one worker or DALI thread): img/s, host CPU ms per image")
            for name, rates in r.items():
                print(f"    {name:40s} {rates['img_s']:8.1f} {rates['host_cpu_ms_per_img']:8.2f}")
            continue
        if not isinstance(r, dict):
            print(f"  {augment:42s} {r if r is None else f'{r:8.1f}'}")
            continue
        print(f"  augment={augment}")
        for key, value in r.items():
            print(f"    {key:40s} {value:8.1f}" if "speedup" not in key
                  else f"    {key:40s} {value:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    report = run(args.images, args.workers, args.repeats)
    print_report(report)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
