"""Input nobody listed, as a careless or hostile user gives it: run directories that are not
runs, links among a run's files, checkpoint folders named after another step, PNG files that
crash libpng or decode to gigapixels, batch sizes with one huge prime factor, YAML alias
bombs. Each ends in one sentence (or a documented recovery), touches nothing it should not,
and never takes the process down."""

from __future__ import annotations

import contextlib
import io
import re
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
from conadv.train.job import train
from conadv.train.parts import check_factories
from conadv.train.run_directory import RunDirectoryError
from tests.helpers import jpeg_folder, run_module, the_error_line, tiny_config

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


def test_overwrite_of_a_run_whose_checkpoints_live_behind_a_link_keeps_the_link(tmp_path):
    """Checkpoints are often put on another file system through a link: overwrite removes the
    earlier run's checkpoints inside it and keeps the link and other files; a checkpoint of
    another run there (which the new run would resume later) stops it before any removal."""
    run, elsewhere = tmp_path / "run", tmp_path / "fast_disk"
    elsewhere.mkdir()
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    train(tiny_config(run, "train.max_steps=2", "checkpoint.every_steps=1"))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["step-00000001", "step-00000002"]
    (elsewhere / "notes.txt").write_text("mine")
    shutil.copytree(elsewhere / "step-00000001", tmp_path / "foreign")
    train(tiny_config(run, "log.overwrite=true", "train.max_steps=1"))
    assert (run / "checkpoints").is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt", "step-00000001"]

    shutil.move(tmp_path / "foreign", elsewhere / "step-00000009")  # the first run's
    manifest = elsewhere / "step-00000009" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 1', '"step": 9'))
    with pytest.raises(RunDirectoryError, match="also holds step-00000009, not this run's"):
        train(tiny_config(run, "log.overwrite=true", "train.max_steps=1"))
    assert sorted(p.name for p in elsewhere.iterdir()) == [
        "notes.txt", "step-00000001", "step-00000009"]


def test_an_empty_run_directory_is_refused_in_one_sentence():
    """An empty log.run_dir meant the current folder (whose config.yaml the demo replaced)."""
    for empty in ("log.run_dir=", "log.run_dir=' '"):
        with pytest.raises(ConfigError, match="log.run_dir is empty"):
            load_config(None, [empty])


@pytest.mark.parametrize("linked", ["tensorboard", "report"])
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
    jpeg_folder(root, per_class=1)  # one step of 4 reads every file
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


def test_conadv_pack_takes_the_pixel_limit_of_the_training_it_packs_for(tmp_path):
    from conadv.cli.pack import main as pack

    jpeg_folder(tmp_path / "data")  # images of 45 x 37 to 45 x 42
    with contextlib.redirect_stderr(io.StringIO()) as stderr, pytest.raises(SystemExit):
        pack([str(tmp_path / "data"), str(tmp_path / "shards"), "--max-pixels", "1700"])
    assert "above data.max_pixels=1,700" in stderr.getvalue()


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


@pytest.mark.parametrize("override, message", [
    ("schedule.step_epochs=[[1]]", r"schedule.step_epochs must be increasing positive epochs"),
    ("schedule.step_epochs=[1, nan]", r"schedule.step_epochs must be increasing positive"),
    ("optim.lr=nan", r"'optim.lr' must be a finite number, got nan"),
    ("train.seed=1180591620717411303424", r"'train.seed' must be at most 9223372036854775807"),
    ("optim.lr=1e300", r"'optim.lr' must be at most"),
    ("data.image_size=60000", r"'data.image_size' must be at most 4096"),
    ("model.arch=timm:hf-hub:nobody/nomodel", r"names a model hub entry, which would be "
                                              r"downloaded"),
])
def test_values_that_ended_in_a_traceback_or_a_kill_are_one_sentence(override, message):
    with pytest.raises(ConfigError, match=message):
        check_factories(load_config(None, [override, "data.eval_resize=4096"]))


def test_the_largest_seed_trains_and_draws_the_same_epoch_order_as_before(tmp_path):
    from conadv.randomness import epoch_seed, evaluation_attack_seed

    assert epoch_seed(5, 2) == 5 * 1_000_003 + 2  # small seeds: the streams are unchanged
    assert evaluation_attack_seed(5, 1, 7) == (5 * 31 + 1) * 1_000_003 + 7
    train(tiny_config(tmp_path / "run", f"train.seed={2**63 - 1}", "train.max_steps=1"))


def test_fp16_on_the_cpu_is_said_to_be_slow(caplog):
    from conadv.train.runtime import autocast_dtype

    with caplog.at_level("WARNING"):
        assert autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    assert "about ten times slower" in caplog.text



@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped at step 2 of 4 (made once; each test damages its own copy)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(tiny_config(run, "train.max_steps=4", "train.stop_at_step=2"))
    return run


def _copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", symlinks=True))


def _cli_error(main, argv: list[str]) -> str:
    """The one sentence a CLI's `main` ends with (exit 2), asserted to be alone."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as finished:
        main(argv)
    text = stderr.getvalue()
    errors = [line for line in text.splitlines() if "error:" in line]
    assert finished.value.code == 2 and len(errors) == 1 and "Traceback" not in text, text[-800:]
    return errors[0]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("config"), "holds no run config"),
    (lambda s: s.__setitem__("config", 5), "holds no run config"),
    (lambda s: s.__setitem__("model", "weights"), "its model is not a mapping"),
    (lambda s: s.__setitem__("optimizer", 5), "its 'optimizer' part is a int"),
    (lambda s: s.__setitem__("config", "train: 5"), "the config inside .* is not a conadv config"),
    (lambda s: s["progress"].pop("step"), "the checkpoint's progress state does not fit"),
    (lambda s: s["model"].__setitem__(sorted(s["model"])[-1], torch.zeros(3)),
     "another shape|size mismatch"),
], ids=["no-config", "int-config", "text-model", "int-optimizer", "config-train-5",
        "progress-without-step", "resized-weight"])
@pytest.mark.parametrize("command", ["resume", "init_from", "conadv-eval"])
def test_a_checkpoint_with_the_wrong_contents_is_one_sentence_wherever_it_is_read(
        tmp_path, stopped_run, edit, message, command):
    from conadv.cli.evaluate import main as evaluate
    from conadv.cli.train import main as train_cli
    from tests.fuzz import rewrite_state
    from tests.helpers import TINY

    run = _copy_of(stopped_run, tmp_path)
    checkpoint = run / "checkpoints" / "step-00000002"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    edit(state)
    rewrite_state(checkpoint, state)
    if ("progress" in message and command != "resume") or (
            "config inside" in message and command == "conadv-eval"):
        message = None  # a new run and an evaluation read only the model and its config, and
        # conadv-eval the run directory's config.yaml before the copy inside the checkpoint
    if command == "conadv-eval":
        main, argv = evaluate, ["--checkpoint", str(checkpoint)]
    else:
        where = (["checkpoint.resume=auto", f"log.run_dir={run}"] if command == "resume" else
                 [f"model.init_from={checkpoint}", f"log.run_dir={tmp_path / 'new'}"])
        main, argv = train_cli, [*TINY, "train.max_steps=4", *where]
    if message is None:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as finished:
            main(argv)
        assert finished.value.code == 0
    else:
        error = _cli_error(main, argv)
        assert re.search(message, error), error


def test_a_run_directory_with_a_foreign_config_or_metrics_is_one_sentence_or_left_out(
        tmp_path, stopped_run):
    from conadv.cli.evaluate import main as evaluate
    from conadv.cli.report import main as report
    from conadv.report import load_run

    run = _copy_of(stopped_run, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(
        [*lines, '{"kind": "eval", "step": 9, "top1": "n/a", "train_top1": 3.0}']) + "\n")
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as finished:
        report(["--out", str(tmp_path / "report"), str(run)])  # the record's text is left out
    assert finished.value.code == 0
    assert "n/a" not in (tmp_path / "report" / "report.md").read_text()
    assert all(isinstance(r.get("top1", 0.0), float) for r in load_run(run).eval)
    (run / "config.yaml").write_text("train: 5\n")
    assert "config.yaml is not a conadv config" in _cli_error(
        report, ["--out", str(tmp_path / "report2"), str(run)])
    assert "config.yaml is not a conadv config" in _cli_error(
        evaluate, ["--checkpoint", str(run)])


def test_evaluation_options_that_were_silently_wrong_are_refused(tmp_path):
    from conadv.cli.evaluate import main as evaluate
    from conadv.train.eval_job import check_export

    with contextlib.redirect_stderr(io.StringIO()) as stderr, pytest.raises(SystemExit):
        evaluate(["--checkpoint", str(tmp_path), "--sharpness", "--sharpness-rho", "nan"])
    assert "--sharpness-rho: must be a finite number above 0, got 'nan'" in stderr.getvalue()
    (tmp_path / "model.pth").symlink_to(tmp_path / "elsewhere" / "victim.pth")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        check_export(tmp_path / "model.pth", force=True)


@pytest.mark.parametrize("damage, message", [
    ("latin-1", r"is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8"),
    ("conflicting-duplicate", r"labels ILSVRC2012_val_class_0_img_0 twice, 'class_0' on line 2 "
                              r"and 'class_1' on line 14"),
    ("row-without-file", r"lists 1 images that .* lacks \(e.g. val_class_0_img_9\)"),
])
def test_a_labels_file_that_was_misread_or_silently_trimmed_is_one_sentence(
        tmp_path, damage, message):
    from conadv.config import DataConfig
    from conadv.data.loader import build_source
    from conadv.data.shards import pack_image_folder
    from conadv.errors import DataError
    from tests.helpers import flat_validation

    flat, rows = flat_validation(tmp_path)
    labels = tmp_path / "labels.csv"
    if damage == "latin-1":
        labels.write_bytes(("\n".join(rows) + "\nvalé,class_0 1\n").encode("latin-1"))
    elif damage == "conflicting-duplicate":
        labels.write_text("\n".join([*rows, rows[1].replace("class_0 1", "class_1 1")]) + "\n")
    else:
        labels.write_text("\n".join([*rows, "val_class_0_img_9,class_0 1 2 3 4"]) + "\n")
    cfg = DataConfig(name="imagefolder", root=str(flat), val_labels=str(labels), workers=0)
    with pytest.raises(DataError, match=message):
        build_source(cfg, "val")
    with pytest.raises(DataError, match=message):  # conadv-pack reads it the same way
        pack_image_folder(flat, tmp_path / "shards", val_labels=str(labels))
    labels.write_text("\n".join([*rows, rows[1]]) + "\n")  # a repeated row is harmless
    assert len(build_source(cfg, "val")) == 12


def test_a_class_folder_that_links_to_itself_is_indexed_once_and_at_once(tmp_path, caplog):
    from conadv.data.sources import ImageFolderSource

    jpeg_folder(tmp_path)
    (tmp_path / "train" / "class_0" / "loop").symlink_to(tmp_path / "train" / "class_0")
    (tmp_path / "train" / "class_0" / "up").symlink_to(tmp_path / "train")
    (tmp_path / "train" / "class_1" / "again").symlink_to(tmp_path / "train" / "class_1")
    started = time.monotonic()
    source = ImageFolderSource(tmp_path / "train")
    assert time.monotonic() - started < 30
    class_0 = [path for path, label in source.samples if label == 0]
    assert len(class_0) == 6 + 6, class_0  # its own 6, and class_1's 6 through train/ once
    assert len([1 for _, label in source.samples if label == 1]) == 6
    assert "leads to a folder already indexed" in caplog.text


@pytest.mark.parametrize("entry", ["../../victim.txt", "/etc/passwd", "..", ""])
def test_a_shard_index_naming_a_file_outside_its_folder_is_refused(tmp_path, entry):
    import json

    from conadv.data.shards import ShardSource, index_path, pack_image_folder
    from conadv.errors import DataError

    jpeg_folder(tmp_path / "folder")
    pack_image_folder(tmp_path / "folder", tmp_path / "shards")
    path = index_path(tmp_path / "shards", "train")
    index = json.loads(path.read_text())
    index["shards"][0]["name"] = entry
    path.write_text(json.dumps(index))
    with pytest.raises(DataError, match="is not a shard index conadv-pack wrote: its shards"):
        ShardSource(tmp_path / "shards", "train")


def test_a_huge_declared_state_file_is_refused_before_it_is_hashed(tmp_path, monkeypatch):
    """A manifest that declares an 8 GiB state.pt, and a file of that size that is a hole:
    refused from its end, not after reading 8 GiB (26 s) at every resume."""
    import json

    from conadv.checkpoints import format as checkpoint_format

    checkpoint = tmp_path / "step-00000007"
    checkpoint.mkdir()
    size = 8 << 30
    with open(checkpoint / "state.pt", "wb") as handle:
        handle.truncate(size)  # sparse: no disk space taken
    (checkpoint / "manifest.json").write_text(json.dumps(
        {"format": 2, "step": 7, "run_id": "x",
         "files": {"state.pt": {"bytes": size, "sha256": "0" * 64}}}))
    monkeypatch.setattr(checkpoint_format, "file_sha256", lambda path: pytest.fail("hashed"))
    assert "not the archive torch.save writes" in checkpoint_format.problem(checkpoint)
