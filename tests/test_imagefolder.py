"""Real JPEG files through torchvision's decoder; the unreadable-file policies."""

from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg

from conadv.config import DataConfig
from conadv.data.dataset import ViewDataset
from conadv.data.loader import build_source
from conadv.data.sources import ImageFolderSource
from conadv.data.transforms import build_train_transforms
from conadv.errors import DataError
from tests.helpers import REPO, run_module


def make_imagefolder(root: Path, classes: int = 2, per_class: int = 6,
                     corrupt: bool = True) -> Path | None:
    """Writes root/{train,val}/class_k/*.jpg; returns the path of the corrupt file if any."""
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = torch.randint(0, 256, (3, 37 + i, 45), dtype=torch.uint8, generator=gen)
                (folder / f"img_{i}.jpg").write_bytes(
                    encode_jpeg(image, quality=90).numpy().tobytes())
    if not corrupt:
        return None
    bad = root / "train" / "class_1" / "img_2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated mid-scan
    return bad


def test_decodes_real_jpegs_with_augmentation(tmp_path):
    make_imagefolder(tmp_path, corrupt=False)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=24, eval_resize=28,
                     augment="autoaugment", second_view=True)
    source = build_source(cfg, "train")
    assert (len(source), source.num_classes) == (12, 2)
    dataset = ViewDataset(source, *build_train_transforms(cfg))
    item = dataset[(3, 1234)]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 24, 24)
    assert item["aug_image"].shape == (3, 24, 24)
    assert torch.equal(dataset[(3, 1234)]["image"], item["image"])  # seeded, reproducible
    assert not torch.equal(dataset[(3, 99)]["image"], item["image"])


def test_skip_policy_replaces_and_counts(tmp_path):
    bad = make_imagefolder(tmp_path)
    source = ImageFolderSource(tmp_path / "train")
    bad_index = [Path(p) for p, _ in source.samples].index(bad)
    dataset = ViewDataset(source, None, bad_images="skip")
    items = [dataset[i] for i in range(len(dataset))]
    assert sum(item["n_bad"] for item in items) == 1
    assert items[bad_index]["n_bad"] == 1
    assert torch.equal(items[bad_index]["image"], items[bad_index + 1]["image"])


def test_fail_policy_names_the_file(tmp_path):
    bad = make_imagefolder(tmp_path)
    dataset = ViewDataset(ImageFolderSource(tmp_path / "train"), None, bad_images="fail")
    with pytest.raises(DataError, match=str(bad)):
        [dataset[i] for i in range(len(dataset))]


def test_missing_and_empty_directories_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable images|empty"):
        ImageFolderSource(tmp_path / "empty")


@pytest.mark.slow
def test_training_on_jpegs_skips_or_fails_from_the_cli(tmp_path):
    bad = make_imagefolder(tmp_path / "data")
    common = ["--config", str(REPO / "configs/demo.yaml"), "data.name=imagefolder",
              f"data.root={tmp_path / 'data'}", "data.image_size=32", "data.eval_resize=32",
              "data.workers=2", "train.global_batch=4", "train.epochs=2",
              "log.progress=false", "log.tensorboard=false", "train.eval_every_epochs=0"]
    skipped = run_module("conadv.cli.train", *common, f"log.run_dir={tmp_path / 'skip'}",
                         "data.bad_images=skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "final test top-1" in skipped.stdout
    import json

    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["bad_images"] == 2  # the corrupt file is drawn once in each of 2 epochs
    assert str(bad) in skipped.stderr  # and named in the log

    failed = run_module("conadv.cli.train", *common, f"log.run_dir={tmp_path / 'fail'}",
                        "data.bad_images=fail")
    assert failed.returncode == 2
    error_lines = [line for line in failed.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and str(bad) in error_lines[0], failed.stderr
    assert "data.bad_images=skip" in error_lines[0]
