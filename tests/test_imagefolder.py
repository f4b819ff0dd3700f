"""Real JPEG files through torchvision's decoder; the unreadable-file policies."""

from pathlib import Path

import pytest
import torch

from conadv.config import DataConfig
from conadv.data.dataset import ViewDataset
from conadv.data.loader import build_source
from conadv.data.sources import ImageFolderSource
from conadv.data.transforms import build_train_transforms
from conadv.errors import DataError
from tests.helpers import (
    REPO,
    flat_validation,
    jpeg_folder,
    run_module,
)


def test_decodes_real_jpegs_with_augmentation(tmp_path):
    jpeg_folder(tmp_path)
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
    bad = jpeg_folder(tmp_path, corrupt=True)
    source = ImageFolderSource(tmp_path / "train")
    bad_index = [Path(p) for p, _ in source.samples].index(bad)
    dataset = ViewDataset(source, None, bad_images="skip")
    items = [dataset[i] for i in range(len(dataset))]
    assert sum(item["n_bad"] for item in items) == 1
    assert items[bad_index]["n_bad"] == 1
    assert torch.equal(items[bad_index]["image"], items[bad_index + 1]["image"])


def test_fail_policy_names_the_file(tmp_path):
    bad = jpeg_folder(tmp_path, corrupt=True)
    dataset = ViewDataset(ImageFolderSource(tmp_path / "train"), None, bad_images="fail")
    with pytest.raises(DataError, match=str(bad)):
        [dataset[i] for i in range(len(dataset))]


def test_missing_and_empty_directories_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        ImageFolderSource(tmp_path / "empty")


@pytest.mark.slow
def test_training_on_jpegs_skips_or_fails_from_the_cli(tmp_path):
    bad = jpeg_folder(tmp_path / "data", corrupt=True)
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


def _model_and_eval(cfg, root):
    from conadv.data.loader import build_eval_loader
    from conadv.models.factory import CifarResNet, ImageClassifier
    from conadv.train.evaluate import evaluate

    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(2, width=4))
    loader = build_eval_loader(cfg, 1, 0, 4, torch.device("cpu"))
    return evaluate(model, loader, torch.device("cpu"))


def test_hidden_folders_are_not_classes_and_an_empty_class_is_an_error(tmp_path):
    jpeg_folder(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "class_0" / ".cache").mkdir()
    (tmp_path / "train" / "class_0" / ".cache" / "x.jpg").write_bytes(b"not an image")
    source = ImageFolderSource(tmp_path / "train")
    assert source.classes == ["class_0", "class_1"] and len(source) == 12
    (tmp_path / "train" / "class_2").mkdir()
    with pytest.raises(DataError, match="class folder .*class_2 has no images"):
        ImageFolderSource(tmp_path / "train")


def test_a_flat_validation_folder_with_imagenet_labels_evaluates_like_class_folders(tmp_path):
    flat, rows = flat_validation(tmp_path)
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("\n".join(rows) + "\n")
    common = dict(name="imagefolder", image_size=24, eval_resize=28, workers=0)
    by_folder = _model_and_eval(DataConfig(root=str(tmp_path / "folders"), **common), None)
    by_labels = _model_and_eval(DataConfig(root=str(flat), val_labels=str(labels), **common),
                                None)
    assert by_labels == by_folder and by_folder["count"] == 12

    text_labels = tmp_path / "labels.txt"  # the two-column form, with class indices
    text_labels.write_text("".join(f"{row.split(',')[0]}.JPEG {row.split(',')[1][6]}\n"
                                   for row in rows[1:]))
    assert _model_and_eval(DataConfig(root=str(flat), val_labels=str(text_labels), **common),
                           None) == by_folder

    labels.write_text(labels.read_text().replace("class_1 1 2", "n09999999 1 2", 1))
    with pytest.raises(DataError, match="class 'n09999999', which is not one of the training"):
        build_source(DataConfig(root=str(flat), val_labels=str(labels), **common), "val")


def test_an_unreadable_evaluation_image_is_left_out_and_counted_never_replaced(tmp_path):
    jpeg_folder(tmp_path)
    bad = tmp_path / "val" / "class_1" / "img_2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=24, eval_resize=28,
                     bad_images="skip", workers=0)
    result = _model_and_eval(cfg, None)
    assert result["count"] == 11 and result["unreadable"] == 1
    bad.unlink()
    without = _model_and_eval(cfg, None)
    assert without["count"] == 11 and "unreadable" not in without
    assert without["top1"] == result["top1"] and without["loss"] == pytest.approx(
        result["loss"], rel=1e-6)


def test_the_file_index_is_cached_and_refreshed_when_a_folder_changes(tmp_path, monkeypatch):
    import os

    from conadv.data import sources

    monkeypatch.setenv("CONADV_CACHE_DIR", str(tmp_path / "cache"))
    jpeg_folder(tmp_path / "data")
    first = ImageFolderSource(tmp_path / "data" / "train")
    assert sources.index_cache_path(tmp_path / "data" / "train").is_file()

    walk = os.walk
    monkeypatch.setattr(sources.os, "walk", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("walked the tree although the cache is fresh")))
    assert ImageFolderSource(tmp_path / "data" / "train").samples == first.samples

    monkeypatch.setattr(sources.os, "walk", walk)
    extra = tmp_path / "data" / "train" / "class_1" / "img_new.jpg"
    extra.write_bytes((tmp_path / "data" / "train" / "class_1" / "img_0.jpg").read_bytes())
    refreshed = ImageFolderSource(tmp_path / "data" / "train")
    assert len(refreshed) == len(first) + 1 and (str(extra), 1) in refreshed.samples


def _index_on_rank(rank: int, world: int) -> int:
    import os

    from conadv.data import sources

    root = Path(os.environ["CONADV_TEST_ROOT"])
    if rank:  # only rank 0 may look at the tree
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} touched the tree")

        sources.os.walk = sources.os.scandir = sources.os.listdir = refuse
    return len(ImageFolderSource(root / "train"))


@pytest.mark.slow
def test_only_rank_0_walks_the_tree(tmp_path, monkeypatch):
    from tests.helpers import run_gloo_ranks

    jpeg_folder(tmp_path / "data")
    monkeypatch.setenv("CONADV_TEST_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CONADV_CACHE_DIR", str(tmp_path / "cache"))
    assert run_gloo_ranks(2, _index_on_rank, tmp_path) == {0: 12, 1: 12}
