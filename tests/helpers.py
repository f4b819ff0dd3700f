"""Shared test helpers: small configs and running the CLI or torchrun as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from conadv.config import RunConfig, load_config
from conadv.distributed import DistEnv

REPO = Path(__file__).resolve().parent.parent

# A few seconds per run on 2 CPU cores: the demo data with a narrow CIFAR ResNet.
TINY = [
    "data.name=digits", "data.image_size=32", "data.eval_resize=32", "data.hflip=false",
    "data.min_crop_scale=0.7", "data.workers=0",
    "model.arch=cifar_resnet", "model.cifar_width=8",
    "optim.lr=0.1", "schedule.warmup_epochs=0.1",
    "train.epochs=1", "train.global_batch=32", "train.device=cpu", "train.deterministic=true",
    "log.tensorboard=false", "log.progress=false", "log.every_steps=1",
    "checkpoint.resume=none",
]


SINGLE = DistEnv("single", 0, 1, 0, "127.0.0.1", 0)  # one process, no process group
CPU = torch.device("cpu")


def tiny_config(run_dir: Path, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY, f"log.run_dir={run_dir}", *overrides])


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_module(module: str, *args: str, timeout: float = 300, **env: str):
    """python -m module args..., as a user would run the console script."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=subprocess_env(**env))


def run_torchrun(nproc: int, *args: str, extra: tuple[str, ...] = (), timeout: float = 300,
                 module: str = "conadv.cli.train"):
    """torchrun of `module` (conadv-train; tests.checked_train checks its stream order)."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--nnodes=1", f"--master-port={port}", *extra, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=timeout,
                          env=subprocess_env())


def the_error_line(result: subprocess.CompletedProcess) -> str:
    """A user error as the CLI reports it: exit status 2, one 'error:' line, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def newest_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


def checkpoint_state(run_dir: Path) -> dict:
    return torch.load(newest_checkpoint(run_dir) / "state.pt", weights_only=False)


def assert_same_run_state(a: dict, b: dict, exact: bool = True) -> None:
    """Two checkpoints hold the same run: every part a checkpoint saves (model with its buffers
    and auxiliary BatchNorm, optimizer moments and counters, grad scaler, ConAdv queue and its
    weight snapshots, step and data position, teachers' checksums, discriminator) is equal, bit
    for bit when `exact`. Only the config text is left out (paths may differ)."""
    compared = _compare(a, b, "", exact)
    assert compared >= 10, f"only {compared} tensors compared"


def _compare(a, b, where: str, exact: bool) -> int:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        if exact:
            assert a.dtype == b.dtype and torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=where)
        return 1
    if isinstance(a, dict):
        keys = set(a) - {"config"} if not where else set(a)
        assert keys == (set(b) - {"config"} if not where else set(b)), (where, keys ^ set(b))
        return sum(_compare(a[k], b[k], f"{where}.{k}", exact) for k in sorted(keys, key=str))
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        return sum(_compare(x, y, f"{where}[{i}]", exact) for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, (where, a, b)
    return 0


def children_of(pid: int) -> list[int]:
    """The direct children of a process (torchrun's agent: its workers)."""
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(child) for child in result.stdout.split()]


def signal_job(root: int, signum: int) -> list[int]:
    """Send `signum` to a process and all its descendants at once, as Slurm signals every
    process of a job step (launcher, torchrun's agent, ranks, DataLoader workers); returns the
    pids signalled."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    job, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        job.extend(frontier)
    for pid in job:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return job


def assert_same_parameters(a: dict, b: dict, at_least: int = 20) -> None:
    """Two checkpoints' parameters agree within a tolerance that a different batch in one step
    would break (the discriminator's too, when distilling). BatchNorm running statistics are
    skipped: each layout updates them from its own micro-batches (DDP broadcasts rank 0's)."""
    weights = [(a["model"], b["model"])]
    if "discriminator" in a:  # distillation's discriminator: its gradients average over ranks
        weights.append((a["discriminator"]["model"], b["discriminator"]["model"]))
    compared = 0
    for mine, theirs in weights:
        for name, value in mine.items():
            if "running_" in name or "num_batches_tracked" in name:
                continue
            torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
            compared += 1
    assert compared > at_least


def _gloo_rank(rank: int, world: int, init_file: str, body, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        queue.put((rank, body(rank, world)))
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(world: int, body, tmp_path: Path, timeout: float = 180) -> dict:
    """body(rank, world) in `world` spawned processes joined by a gloo group; {rank: result}.
    body must be a module-level (picklable) function."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, world, str(tmp_path / "init"), body, queue))
             for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return results


def teacher_files(directory: Path, count: int = 2, width: int = 8) -> str:
    """`count` untrained CIFAR-ResNet teachers saved as state-dict files in `directory`; the
    override that distils from them. Untrained is enough where only equivalence is tested."""
    from conadv.models.factory import CifarResNet

    entries = []
    for i in range(count):
        torch.manual_seed(i)
        path = directory / f"teacher{i}.pt"
        torch.save(CifarResNet(10, width=width).state_dict(), path)
        entries.append(f"{{weights: {path}, arch: cifar_resnet, cifar_width: {width}}}")
    return f"distill.teachers=[{', '.join(entries)}]"


def _photo(height: int, width: int, seed: int):
    """A smooth, photo-like PIL image (noise would exaggerate resampler differences)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    y, x = torch.linspace(0, 1, height)[:, None], torch.linspace(0, 1, width)[None]
    phases = torch.rand(3, generator=gen)
    base = torch.stack([torch.sin(6 * (x + y) + 6 * p) for p in phases]) * 90 + 128
    noise = torch.randn(3, height, width, generator=gen) * 6
    pixels = (base + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


QUIRKS = ("cmyk", "gray", "png_named_jpeg", "exif_rotated", "truncated", "zero_bytes",
          "header_only", "bad_huffman")


def quirky_folder(root: Path, per_class: int = 10) -> dict[str, list[Path]]:
    """root/{train,val}/class_{0,1}/*.JPEG: photo-like JPEGs of varied sizes and, in each
    split, one file of each quirk: a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG, a JPEG
    with EXIF orientation 6, and four unreadable files: a truncated JPEG, an empty file, a JPEG
    whose headers are complete but whose scan is missing, and one whose Huffman table is
    zeroed (the last two pass a header check and fail only inside a decoder). Returns split ->
    the paths of the unreadable files."""
    import io

    from PIL import Image

    unreadable: dict[str, list[Path]] = {}
    for s, split in enumerate(("train", "val")):
        for c in range(2):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                _photo(80 + 11 * i, 100 + 9 * c + 3 * i, 100 * s + 10 * c + i).save(
                    folder / f"img_{i}.JPEG", quality=92)
        folder = root / split / "class_1"
        image = _photo(90, 120, 7 + s)
        image.convert("CMYK").save(folder / "cmyk.JPEG", "JPEG", quality=92)
        image.convert("L").save(folder / "gray.JPEG", "JPEG", quality=92)
        image.save(folder / "png_named_jpeg.JPEG", "PNG")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        image.save(folder / "exif_rotated.JPEG", "JPEG", quality=92, exif=exif.tobytes())
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=92)
        (folder / "truncated.JPEG").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        (folder / "zero_bytes.JPEG").write_bytes(b"")
        encoded = buffer.getvalue()
        scan = encoded.find(b"\xff\xda")
        (folder / "header_only.JPEG").write_bytes(encoded[:scan] + b"\xff\xd9")
        table = encoded.find(b"\xff\xc4")
        (folder / "bad_huffman.JPEG").write_bytes(
            encoded[:table + 4] + bytes(26) + encoded[table + 30:])
        unreadable[split] = [folder / f"{name}.JPEG" for name in
                             ("truncated", "zero_bytes", "header_only", "bad_huffman")]
    return unreadable


def real_photo_folder(root: Path, classes: int = 2, per_class: int = 100,
                      splits: tuple[str, ...] = ("train", "val")) -> Path:
    """root/<split>/class_<c>/*.jpg: JPEGs cut from the two real photographs that ship with
    scikit-learn (china.jpg, flower.jpg), at varied sizes and aspect ratios, re-encoded by PIL
    at varied qualities, so the decoders see real photographic content."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]  # 427 x 640
    gen = torch.Generator().manual_seed(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                height, width = (int(v) for v in torch.randint(60, 420, (2,), generator=gen))
                top = int(torch.randint(0, 427 - height + 1, (1,), generator=gen))
                left = int(torch.randint(0, 640 - width + 1, (1,), generator=gen))
                quality = int(torch.randint(75, 96, (1,), generator=gen))
                photos[(c + i) % 2].crop((left, top, left + width, top + height)).save(
                    folder / f"img_{i:03d}.jpg", quality=quality)
    return root


def fit(trainer) -> dict:
    """A Trainer built by a test, trained to the end under the stop request conadv-train's job
    would make (conadv.train.job.train)."""
    from conadv.train.preemption import StopRequest

    env = trainer.env
    return trainer.fit(StopRequest(trainer.run_dir, env.is_main, trainer.device,
                                   env.is_distributed))


# ------------------------------------------------------------------ image folders

def jpeg_folder(root: Path, classes: int = 2, per_class: int = 6, photo_like: bool = False,
                corrupt: bool = False) -> Path | None:
    """root/{train,val}/class_k/img_i.jpg, encoded by torchvision. `photo_like`: smooth images
    of varied sizes (noise would exaggerate resampler differences that real photos do not show;
    the DALI comparisons need them); else noise of 45 x (37 + i). `corrupt`: one training file
    truncated mid-scan, whose path is returned."""
    from torchvision.io import encode_jpeg

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                if photo_like:
                    h, w = 90 + 13 * i, 120 + 7 * c
                    y, x = torch.linspace(0, 1, h)[:, None], torch.linspace(0, 1, w)[None]
                    phase = torch.rand(3, generator=gen)
                    base = (torch.stack([torch.sin(6 * (x + y) + 6 * p) for p in phase]) * 90
                            + 128)
                    noise = torch.randn(3, h, w, generator=gen) * 6
                    image, quality = (base + noise).clamp(0, 255).to(torch.uint8), 92
                else:
                    image = torch.randint(0, 256, (3, 37 + i, 45), dtype=torch.uint8,
                                          generator=gen)
                    quality = 90
                (folder / f"img_{i}.jpg").write_bytes(
                    encode_jpeg(image, quality=quality).numpy().tobytes())
    if not corrupt:
        return None
    bad = root / "train" / "class_1" / "img_2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated mid-scan
    return bad


def flat_validation(tmp_path: Path) -> tuple[Path, list[str]]:
    """tmp_path/folders (class folders) and tmp_path/flat: the same train/, and val/ as
    ImageNet ships it (one flat folder); returns flat and the rows of its labels CSV."""
    jpeg_folder(tmp_path / "folders")
    flat = tmp_path / "flat"
    (flat / "val").mkdir(parents=True)
    (flat / "train").symlink_to(tmp_path / "folders" / "train")
    rows = ["ImageId,PredictionString"]
    for image in sorted((tmp_path / "folders" / "val").glob("*/*.jpg")):
        name = f"ILSVRC2012_val_{image.parent.name}_{image.stem}"
        (flat / "val" / f"{name}.JPEG").write_bytes(image.read_bytes())
        rows.append(f"{name},{image.parent.name} 1 2 30 40 {image.parent.name} 5 6 7 8")
    return flat, rows


# DALI's three views of a batch (clean, augmented by a policy, adversarial)
THREE_VIEWS = ["data.loader=dali", "data.augment=autoaugment", "data.second_view=true",
               "adv.enabled=true", "adv.tau=1"]


# ------------------------------------------------------------------ what a step does

COLLECTIVE_WORDS = ("all_reduce", "allreduce", "broadcast", "all_gather", "allgather",
                    "reduce_scatter", "barrier", "gloo:")


def count_collectives(fn) -> int:
    """Collective calls the profiler sees while `fn` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events()
               if any(word in e.name.lower() for word in COLLECTIVE_WORDS))


def poison_loss_at(monkeypatch, calls: set[int]) -> None:
    """Make the training loss NaN at the given (0-based) micro-step calls."""
    from conadv.train import objectives

    original = objectives.weighted_views
    counter = {"n": 0}

    def loss(view_loss, logits, inputs):
        value, stats = original(view_loss, logits, inputs)
        if counter["n"] in calls:
            value = value * float("nan")
        counter["n"] += 1
        return value, stats

    monkeypatch.setattr(objectives, "weighted_views", loss)
