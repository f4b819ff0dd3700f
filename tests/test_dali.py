"""The DALI loaders (CPU operators here, nvJPEG on a GPU) against the torchvision path: the same
samples, order, labels, crop boxes, flips and augmentation-policy draws, images within the
decoders' rounding, the same evaluation crops and counts, the same unreadable-file decisions,
exact resume of the three-view ConAdv recipe and the same data on 2 ranks as on 1 rank with
accumulation 2."""

import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from conadv.cli import pack
from conadv.config import DataConfig
from conadv.data.loader import build_eval_loader, build_source, build_train_stream, choose_loader
from conadv.errors import ConfigError
from conadv.train.job import train
from tests.helpers import (
    CPU,
    THREE_VIEWS,
    TINY,
    assert_same_parameters,
    assert_same_run_state,
    checkpoint_state,
    jpeg_folder,
    quirky_folder,
    real_photo_folder,
    run_module,
    run_torchrun,
    tiny_config,
)

dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
from conadv.data.dali import crop_and_flip, require_dali  # noqa: E402
from conadv.randomness import sample_seed  # noqa: E402


def _cfg(root, loader, **extra) -> DataConfig:
    return DataConfig(**{"name": "imagefolder", "root": str(root), "image_size": 48,
                         "eval_resize": 56, "min_crop_scale": 0.25, "workers": 0,
                         "loader": loader, **extra})


def test_crop_boxes_and_flips_are_the_torchvision_paths(monkeypatch):
    crop = v2.RandomResizedCrop(48, scale=(0.25, 1.0), antialias=True)
    drawn = []
    original = v2.RandomResizedCrop.make_params

    def record(self, flat_inputs):
        params = original(self, flat_inputs)
        drawn.append(params)
        return params

    transform = v2.Compose([crop, v2.RandomHorizontalFlip()])
    for seed, (h, w) in enumerate([(90, 120), (200, 64), (37, 300)] * 5):
        image = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            monkeypatch.setattr(v2.RandomResizedCrop, "make_params", record)
            out = transform(image)
            monkeypatch.setattr(v2.RandomResizedCrop, "make_params", original)
        box, flip = crop_and_flip(seed, h, w, crop, hflip=True)
        assert box == drawn[-1]
        unflipped = v2.functional.resized_crop(image, box["top"], box["left"], box["height"],
                                               box["width"], [48, 48], antialias=True)
        expected = v2.functional.horizontal_flip(unflipped) if flip else unflipped
        assert torch.equal(out, expected)


def test_dali_batches_equal_the_torchvision_path_up_to_decoder_rounding(tmp_path):
    """Per pixel: DALI's crops are within rounding of torchvision's (mean 0.13-0.20 of 255,
    99th percentile 1 level, measured), and a crop one pixel off would not be (mean 2.6-3.4,
    99th percentile 5-10): the bounds can catch an offset."""
    root = tmp_path
    jpeg_folder(root, classes=3, per_class=8, photo_like=True)
    streams = {loader: build_train_stream(_cfg(root, loader), 1, 0, 6, 1, 7, CPU)
               for loader in ("torchvision", "dali")}
    crop = v2.RandomResizedCrop(48, scale=(0.25, 1.0), antialias=True)
    source = streams["dali"].loader.source
    shifted_errors = []
    for _ in range(2 * streams["dali"].batches_per_epoch + 1):  # across an epoch boundary
        (a, key_a), (b, key_b) = streams["torchvision"].next(), streams["dali"].next()
        epoch = streams["dali"].epoch  # of the batch just drawn
        assert key_a == key_b
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["index"], b["index"])
        assert a["image"].shape == b["image"].shape and b["image"].dtype == torch.uint8
        for ours, theirs, index in zip(b["image"], a["image"], b["index"].tolist()):
            error = (ours.float() - theirs.float()).abs()
            assert 0 < error.mean() <= 0.5 and error.quantile(0.99) <= 2, index
            image = source.load(index)
            box, flip = crop_and_flip(sample_seed(7, epoch, index), *image.shape[1:], crop,
                                      True)
            if box["left"] + box["width"] < image.shape[2]:  # the guard: one pixel right
                off = v2.functional.resized_crop(image, box["top"], box["left"] + 1,
                                                 box["height"], box["width"], [48, 48],
                                                 antialias=True)
                off = v2.functional.horizontal_flip(off) if flip else off
                shifted_errors.append((ours.float() - off.float()).abs().mean())
    assert len(shifted_errors) > 10 and min(shifted_errors) > 1.0


def test_exif_rotated_jpegs_are_read_as_stored_as_torchvision_reads_them(tmp_path):
    """torchvision's decoder ignores the EXIF orientation and the crop box is drawn from the
    stored size; DALI's decoder would rotate (its default), cropping another region or
    outside the image."""
    from PIL import Image

    root = tmp_path
    jpeg_folder(root, classes=2, per_class=4, photo_like=True)
    for path in (root / "train").rglob("*.jpg"):
        image = Image.open(path)
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        image.save(path, quality=92, exif=exif.tobytes())
    streams = {loader: build_train_stream(_cfg(root, loader), 1, 0, 4, 1, 7, CPU)
               for loader in ("torchvision", "dali")}
    for _ in range(4):
        (a, _), (b, _) = streams["torchvision"].next(), streams["dali"].next()
        assert (a["image"].float() - b["image"].float()).abs().mean() <= 2.0


# the published recipe's three views: clean, AutoAugment and adversarial (stale by tau = 1)



def test_the_three_view_conadv_recipe_through_dali_resumes_exactly(tmp_path):
    jpeg_folder(tmp_path / "data", classes=3, per_class=8, photo_like=True)
    run = ["data.name=imagefolder", f"data.root={tmp_path / 'data'}", *THREE_VIEWS,
           "data.image_size=32", "data.eval_resize=36", "train.global_batch=6",
           "train.max_steps=8", "checkpoint.every_steps=100"]
    straight = train(tiny_config(tmp_path / "a", *run))
    # 4 steps per epoch (24 images, batch 6): step 6 is in the middle of the second epoch
    train(tiny_config(tmp_path / "b", *run, "train.stop_at_step=6"))
    resumed = train(tiny_config(tmp_path / "b", *run, "checkpoint.resume=auto"))
    assert resumed["resumed_from"].endswith("step-00000006")
    assert straight["final_eval"] == resumed["final_eval"]
    assert_same_run_state(checkpoint_state(tmp_path / "a"), checkpoint_state(tmp_path / "b"))


@pytest.mark.slow
def test_dali_on_two_ranks_equals_one_rank_with_accumulation(tmp_path):
    jpeg_folder(tmp_path / "data", classes=3, per_class=8, photo_like=True)
    run = [*TINY, "data.name=imagefolder", f"data.root={tmp_path / 'data'}", *THREE_VIEWS,
           "data.image_size=32", "data.eval_resize=36",
           "train.global_batch=6", "train.max_steps=4", "train.deterministic=false"]
    two = run_torchrun(2, *run, f"log.run_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_module("conadv.cli.train", *run, "train.accumulation=2",
                     f"log.run_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_parameters(checkpoint_state(tmp_path / "two"), checkpoint_state(tmp_path / "one"))


def test_a_missing_dali_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install '\.\[dali\]'"):
        require_dali()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """200 training and 60 validation JPEGs cut from real photographs."""
    root = tmp_path_factory.mktemp("photos")
    real_photo_folder(root, per_class=100, splits=("train",))
    real_photo_folder(root, per_class=30, splits=("val",))
    return root


@pytest.mark.parametrize("augment, second_view", [("autoaugment", True),
                                                  ("randaugment", False),
                                                  ("trivialaugment", True)])
def test_policy_draws_are_the_torchvision_paths(photos, monkeypatch, augment, second_view):
    """Every sample of 200 real JPEGs gets the same policy operations with the same magnitudes
    on both paths (the draws the published policy makes under the sample's seed, after the
    crop and flip draws); the augmented images then differ only by the decoders' rounding,
    amplified by thresholding operations (solarize, posterize) on a few images."""
    applied: list[tuple[str, float]] = []
    policy_op = v2._auto_augment._AutoAugmentBase._apply_image_or_video_transform

    def record(self, image, transform_id, magnitude, *args, **kwargs):
        applied.append((transform_id, round(float(magnitude), 6)))
        return policy_op(self, image, transform_id, magnitude, *args, **kwargs)

    monkeypatch.setattr(v2._auto_augment._AutoAugmentBase, "_apply_image_or_video_transform",
                        record)
    cfg = {loader: _cfg(photos, loader, augment=augment, second_view=second_view)
           for loader in ("torchvision", "dali")}
    drawn, images = {}, {}
    for loader in cfg:
        stream = build_train_stream(cfg[loader], 1, 0, 50, 1, 7, CPU)
        applied.clear()
        batches = [stream.next()[0] for _ in range(4)]  # the 200 images of epoch 0
        drawn[loader] = list(applied)
        images[loader] = torch.cat([b["aug_image" if second_view else "image"] for b in batches])
        assert torch.equal(torch.cat([b["index"] for b in batches]).sort().values,
                           torch.arange(200))
    assert len(drawn["dali"]) >= 200 and drawn["dali"] == drawn["torchvision"]
    error = (images["dali"].float() - images["torchvision"].float()).abs().flatten(1).mean(1)
    # measured: median 0.13-0.23, 90th percentile 0.28-0.89 levels of 255
    assert error.median() <= 0.4 and error.quantile(0.9) <= 1.5, error.sort().values[-10:]


def test_autoaugment_is_the_published_imagenet_policy():
    """The first sub-policies of AutoAugment's ImageNet policy as published (Cubuk et al.,
    CVPR 2019, appendix table: operation, probability, magnitude level of 10)."""
    from conadv.data.transforms import build_policy

    published = [(("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
                 (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
                 (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
                 (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
                 (("Equalize", 0.4, None), ("Solarize", 0.2, 4))]
    policy = build_policy("autoaugment")
    assert len(policy._policies) == 25 and policy._policies[:5] == published


def test_dali_evaluation_equals_the_torchvision_path(tmp_path, photos):
    """Resize of the shorter side + centre crop at a test size other than the training size:
    the same images in the same order with the same labels, within rounding; the quirky files
    (CMYK, grayscale, PNG named .JPEG, EXIF-rotated) too; unreadable files left out and
    counted on both paths."""
    quirky = quirky_folder(tmp_path / "quirky")
    for root, expected_bad in ((photos, 0), (tmp_path / "quirky", 4)):
        out = {}
        for loader in ("torchvision", "dali"):
            cfg = _cfg(root, loader, eval_image_size=64, eval_resize=72, bad_images="skip")
            batches = list(build_eval_loader(cfg, 1, 0, 16, CPU))
            out[loader] = {key: torch.cat([b[key] for b in batches])
                           for key in ("image", "label", "index", "valid")}
        a, b = out["torchvision"], out["dali"]
        assert b["image"].shape[1:] == (3, 64, 64) and a["image"].shape == b["image"].shape
        for key in ("label", "index", "valid"):
            assert torch.equal(a[key], b[key]), key
        assert int((1 - b["valid"]).sum()) == expected_bad
        valid = b["valid"].bool()
        error = (a["image"][valid].float() - b["image"][valid].float()).abs().flatten(1)
        # measured: per-image mean 0.1-0.2 levels, 99th percentile 1
        assert error.mean(1).max() <= 0.5 and error.quantile(0.99, dim=1).max() <= 2
    assert quirky["val"]


def test_unreadable_training_files_are_skipped_alike_on_both_paths(tmp_path):
    """data.bad_images=skip: the unreadable files (two of which pass the header check and fail
    only inside DALI's decoder) are replaced by the next readable sample and counted, the same
    samples and counts on both paths."""
    quirky_folder(tmp_path)
    served = {}
    for loader in ("torchvision", "dali"):
        stream = build_train_stream(_cfg(tmp_path, loader, bad_images="skip"), 1, 0, 8, 1, 3,
                                    CPU)
        batches = [stream.next()[0] for _ in range(stream.batches_per_epoch)]
        served[loader] = [torch.cat([b[key] for b in batches]) for key in ("index", "n_bad")]
    names = [Path(path).name for path, _ in build_source(_cfg(tmp_path, "dali"), "train").samples]
    index, n_bad = served["dali"]
    assert torch.equal(index, served["torchvision"][0])
    assert torch.equal(n_bad, served["torchvision"][1]) and int(n_bad.sum()) >= 4
    assert not {names[i] for i in index.tolist()} & {
        "truncated.JPEG", "zero_bytes.JPEG", "header_only.JPEG", "bad_huffman.JPEG"}


def test_the_three_view_recipe_trains_through_dali_on_quirky_files_and_on_their_shards(
        tmp_path):
    """ConAdv with the AutoAugment view on the quirky folder (skip): every readable validation
    image evaluated once, the unreadable ones counted; packed with --skip-unreadable, the same
    folder trains through shards with the same counts and nothing left to skip."""
    quirky_folder(tmp_path / "folder")
    with pytest.raises(SystemExit) as packed:
        pack.main([str(tmp_path / "folder"), str(tmp_path / "shards"), "--skip-unreadable"])
    assert packed.value.code == 0
    recipe = ["data.loader=dali", "data.augment=autoaugment", "data.second_view=true",
              "adv.enabled=true", "data.bad_images=skip", "data.image_size=32",
              "data.eval_resize=36", "train.global_batch=8", "train.max_steps=3"]
    on_folder = train(tiny_config(tmp_path / "a", *recipe, "data.name=imagefolder",
                                  f"data.root={tmp_path / 'folder'}"))
    assert on_folder["final_eval"]["count"] == 24 and on_folder["final_eval"]["unreadable"] == 4
    on_shards = train(tiny_config(tmp_path / "b", *recipe, "data.name=shards",
                                  f"data.root={tmp_path / 'shards'}"))
    assert on_shards["final_eval"]["count"] == 24
    assert "unreadable" not in on_shards["final_eval"]  # left out when packed
    assert on_shards["bad_images"] == 0 < on_folder["bad_images"]


def test_auto_picks_dali_only_for_image_files_on_a_cuda_device(caplog, monkeypatch):
    import logging

    from conadv.data import loader

    monkeypatch.setattr(loader, "_announced", set())
    caplog.set_level(logging.INFO, logger="conadv.data.loader")
    cuda = torch.device("cuda", 0)
    files = DataConfig(name="imagefolder", root="x", loader="auto")
    assert choose_loader(files, CPU) == "torchvision"
    assert choose_loader(files, cuda) == "dali"
    assert choose_loader(DataConfig(name="digits", loader="auto"), cuda) == "torchvision"
    assert choose_loader(DataConfig(name="shards", root="x", loader="auto"), cuda) == "dali"
    assert choose_loader(DataConfig(name="imagefolder", root="x", loader="torchvision"),
                         cuda) == "torchvision"
    assert "a CUDA device is used and DALI is installed" in caplog.text
