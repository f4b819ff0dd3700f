"""Input nobody listed, as a careless or hostile user gives it: run directories that are not
runs, links among a run's files, checkpoint folders named after another step, PNG files that
crash libpng or decode to gigapixels, batch sizes with one huge prime factor, YAML alias
bombs. Each ends in one sentence (or a documented recovery), touches nothing it should not,
and never takes the process down."""

from __future__ import annotations

import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conadv.config import load_config, plan_batch
from conadv.data.decode import UnreadableImage, decode_rgb
from conadv.errors import ConfigError
from conadv.train.run_directory import RunDirectoryError
from conadv.train.trainer import train
from tests.helpers import run_module, the_error_line, tiny_config
from tests.test_imagefolder import make_imagefolder

# ------------------------------------------------------------------ run directories


def test_overwrite_leaves_a_folder_that_is_not_a_conadv_run_alone(tmp_path):
    """log.overwrite=true used to delete config.yaml, checkpoints/... of any folder."""
    (tmp_path / "config.yaml").write_text("my: own config\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="no run.json: it is not a conadv run"):
        train(tiny_config(tmp_path, "log.overwrite=true", "checkpoint.resume=none",
                          "train.max_steps=1"))
    assert (tmp_path / "config.yaml").read_text() == "my: own config\n"
    assert (tmp_path / "checkpoints" / "notes.txt").read_text() == "mine"


def test_an_empty_run_directory_is_refused_in_one_sentence():
    """An empty log.run_dir meant the current folder (whose config.yaml the demo replaced)."""
    for empty in ("log.run_dir=", "log.run_dir=' '"):
        with pytest.raises(ConfigError, match="log.run_dir is empty"):
            load_config(None, [empty])


@pytest.mark.parametrize("linked", ["tensorboard", "checkpoints"])
def test_overwrite_refuses_a_run_with_a_linked_folder_before_removing_anything(tmp_path,
                                                                              linked):
    run = tmp_path / "run"
    train(tiny_config(run, "train.max_steps=1"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    if (run / linked).exists():
        shutil.rmtree(run / linked)
    (run / linked).symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(RunDirectoryError, match=f"{linked} is a symbolic link"):
        train(tiny_config(run, "log.overwrite=true", "checkpoint.resume=none",
                          "train.max_steps=1"))
    assert sorted(p.name for p in run.iterdir()) == before  # nothing half-removed
    assert (elsewhere / "precious.txt").read_text() == "keep"


def test_a_copied_step_folder_does_not_take_the_place_of_a_new_checkpoint(tmp_path):
    """keep_last=1 and a copy of step 3 named step-00000009: pruning counted the copy as the
    newest and deleted each new checkpoint right after writing it."""
    run = ["checkpoint.every_steps=1", "checkpoint.keep_last=1", "train.max_steps=10"]
    train(tiny_config(tmp_path, *run, "train.stop_at_step=3"))
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(checkpoints / "step-00000003", checkpoints / "step-00000009")
    train(tiny_config(tmp_path, *run, "checkpoint.resume=auto", "train.stop_at_step=5"))
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-")) == [
        "step-00000005", "step-00000009"]


@pytest.mark.parametrize("fake", ["link", "copy"])
def test_a_checkpoint_folder_named_after_another_step_is_not_trusted(tmp_path, fake):
    """step-00000009 as a link to (or a copy of) step 1: the resume used to rewind to it, and
    every later resume rewound again."""
    run = ["checkpoint.every_steps=1", "checkpoint.keep_last=10", "train.max_steps=10"]
    train(tiny_config(tmp_path, *run, "train.stop_at_step=3"))
    checkpoints = tmp_path / "checkpoints"
    if fake == "link":
        (checkpoints / "step-00000009").symlink_to(checkpoints / "step-00000001")
    else:
        shutil.copytree(checkpoints / "step-00000001", checkpoints / "step-00000009")
    summary = train(tiny_config(tmp_path, *run, "checkpoint.resume=auto"))
    assert summary["resumed_from"].endswith("step-00000003")
    assert summary["steps"] == 10 and (checkpoints / "step-00000010").is_dir()
    assert (checkpoints / "step-00000009" / "manifest.json").is_file()  # this run's own now


# ------------------------------------------------------------------ images

def _chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def png_with_rows(width: int, height: int, rows: int) -> bytes:
    """An RGB PNG whose header says width x height but whose image data holds `rows` rows:
    libpng aborts the process on it ("Not enough image data") when rows < height."""
    generator = np.random.default_rng(0)
    raw = b"".join(b"\x00" + generator.integers(0, 256, width * 3, dtype=np.uint8).tobytes()
                   for _ in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def test_pngs_that_would_crash_or_exhaust_the_decoder_are_unreadable_images():
    assert decode_rgb(png_with_rows(16, 8, 8), 10**6).shape == (3, 8, 16)
    with pytest.raises(UnreadableImage, match="image data holds"):
        decode_rgb(png_with_rows(16, 8, 4), 10**6)  # libpng: "Not enough image data"
    with pytest.raises(UnreadableImage, match="above data.max_pixels=1,000,000"):
        decode_rgb(png_with_rows(30000, 30000, 1), 10**6)
    whole = png_with_rows(16, 8, 8)
    for cut in (len(whole) // 2, len(whole) - 20, 30):
        with pytest.raises(UnreadableImage):
            decode_rgb(whole[:cut], 10**6)
    # found by the fuzzer: any libpng error ended the process, a bad IDAT checksum too
    flipped = bytearray(whole)
    flipped[whole.index(b"IDAT") + 6] ^= 0xFF
    with pytest.raises(UnreadableImage, match="'IDAT' chunk is corrupt"):
        decode_rgb(bytes(flipped), 10**6)


def _folder_with_bad_pngs(root: Path) -> list[Path]:
    make_imagefolder(root, per_class=1, corrupt=False)  # one step of 4 reads every file
    short = root / "train" / "class_0" / "short.png"
    short.write_bytes(png_with_rows(40, 40, 10))
    huge = root / "train" / "class_1" / "huge.png"
    huge.write_bytes(png_with_rows(30000, 30000, 1))
    return [short, huge]


FOLDER = ["data.name=imagefolder", "data.image_size=24", "data.eval_resize=28",
          "train.global_batch=4", "data.workers=0",
          "data.max_pixels=4000000"]


@pytest.mark.slow
def test_training_skips_a_png_that_crashes_libpng_and_names_it_under_fail(tmp_path):
    """In a subprocess: torchvision's decoder used to end the process with a segfault."""
    from tests.helpers import TINY

    _folder_with_bad_pngs(tmp_path / "data")
    common = [*TINY, *FOLDER, f"data.root={tmp_path / 'data'}"]
    skipped = run_module("conadv.cli.train", *common, "data.bad_images=skip",
                         f"log.run_dir={tmp_path / 'skip'}", "train.epochs=1",
                         "train.max_steps=0")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "short.png" in skipped.stderr and "huge.png" in skipped.stderr
    failed = run_module("conadv.cli.train", *common, "data.bad_images=fail",
                        f"log.run_dir={tmp_path / 'fail'}", "train.epochs=1",
                        "train.max_steps=0")
    line = the_error_line(failed)
    assert ".png" in line and ("image data holds" in line or "data.max_pixels" in line)


@pytest.mark.slow
def test_conadv_pack_leaves_out_a_png_that_crashes_libpng(tmp_path):
    bad = _folder_with_bad_pngs(tmp_path / "data")
    packed = run_module("conadv.cli.pack", str(tmp_path / "data"), str(tmp_path / "shards"),
                        "--skip-unreadable")
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert all(path.name in packed.stderr for path in bad)


# ------------------------------------------------------------------ configs

def test_a_batch_with_a_huge_prime_factor_is_planned_at_once():
    """plan_batch tried every divisor one by one (killed after 40 s)."""
    cfg = load_config(None, ["train.global_batch=1000000000039",
                             "train.max_per_device_batch=1"])
    started = time.monotonic()
    plan = plan_batch(cfg.train, 1)
    assert (plan.per_device, plan.accumulation) == (1, 1000000000039)
    assert time.monotonic() - started < 5


def test_a_yaml_alias_bomb_is_refused_in_one_sentence(tmp_path):
    """A 223-byte file expanding by 9 per level cost 78 s of CPU and then a traceback."""
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
               f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="its aliases expand to more than 100,000 values"):
        load_config(bomb)
    assert time.monotonic() - started < 5


def test_a_value_that_contains_itself_is_refused_in_one_sentence(tmp_path):
    """Found by the fuzzer: `&a [*a]` made a recursive list and a RecursionError."""
    with pytest.raises(ConfigError, match="expects a value of type int, got '&a"):
        load_config(None, ["model.cifar_blocks=&a [*a]"])  # read as text: not YAML here
    config = tmp_path / "loop.yaml"
    config.write_text("model:\n  cifar_blocks: &a [*a]\n")
    with pytest.raises(ConfigError, match="an alias refers to the value that contains it"):
        load_config(config)


def test_anchors_that_stay_small_are_still_yaml(tmp_path):
    config = tmp_path / "anchors.yaml"
    config.write_text("data: {image_size: &size 40, eval_resize: *size}\n")
    assert load_config(config).data.eval_resize == 40


def _interlaced_png(array: np.ndarray) -> bytes:
    """An Adam7-interlaced RGB PNG of `array` (Pillow does not write them)."""
    from conadv.data.decode import _ADAM7

    raw = b""
    for x0, y0, dx, dy in _ADAM7:
        passed = array[y0::dy, x0::dx]
        if passed.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in passed)
    height, width = array.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def test_valid_pngs_decode_to_the_pixels_torchvision_gives():
    """PNGs go through Pillow now; the pixels every loader shares must not change (8-bit
    colour types, a palette with transparency, 1-bit, interlaced)."""
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    array = np.random.default_rng(1).integers(0, 256, (37, 53, 3), np.uint8)
    files = []
    for mode in ("RGB", "RGBA", "L", "LA", "P", "1"):
        buffer = io.BytesIO()
        image = Image.fromarray(array).convert(mode)
        image.save(buffer, format="PNG", **({"transparency": 3} if mode == "P" else {}))
        files.append(buffer.getvalue())
    files += [png_with_rows(53, 37, 37), _interlaced_png(array)]
    for data in files:
        expected = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                mode=ImageReadMode.RGB)
        assert torch.equal(decode_rgb(data, 10**6), expected)


def test_a_state_file_of_one_pickle_opcode_is_refused_in_one_sentence(tmp_path):
    """Found by the fuzzer: a one-byte state.pt (TUPLE2 on an empty stack) raised
    IndexError from torch's weights-only unpickler."""
    from conadv.checkpoints.format import load_state
    from conadv.errors import CheckpointError

    (tmp_path / "state.pt").write_bytes(b"\x86")
    with pytest.raises(CheckpointError, match="cannot be read as a checkpoint"):
        load_state(tmp_path)


def test_values_nested_too_deeply_are_refused_in_one_sentence(tmp_path):
    """[[[[...]]]] a few thousand deep raised RecursionError from YAML and OmegaConf."""
    nested = "[" * 3000 + "]" * 3000
    with pytest.raises(ConfigError):
        load_config(None, [f"model.cifar_blocks={nested}"])
    config = tmp_path / "deep.yaml"
    config.write_text(f"model:\n  cifar_blocks: {nested}\n")
    with pytest.raises(ConfigError, match="nests its values too deeply"):
        load_config(config)
    shallow = "[" * 400 + "]" * 400  # parsed by YAML, too deep for the config's merge
    with pytest.raises(ConfigError, match="nests too deeply to be a config value"):
        load_config(None, [f"model.cifar_blocks={shallow}"])
