"""The built-in demo data (conadv/data/sources.py): scikit-learn's digits, read without
importing scikit-learn, against scikit-learn's own loader and split."""

import importlib.machinery
import importlib.util

import numpy as np
import pytest
import torch

from conadv.data import sources
from conadv.data.sources import DigitsSource
from conadv.errors import DataError


def test_the_digits_and_their_split_are_scikit_learns():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels, labels = sources._digits_data()
    assert np.array_equal(pixels, digits.images) and np.array_equal(labels, digits.target)
    train, test = train_test_split(np.arange(len(digits.target)), test_size=0.2,
                                   stratify=digits.target, random_state=0)
    for split, expected in (("train", train), ("test", test)):
        source = DigitsSource(split)
        chosen = np.sort(expected)
        assert len(source) == len(chosen)
        assert [source.label(i) for i in range(len(source))] == digits.target[chosen].tolist()
        image = source.load(3)
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        # the image is that sample's 8x8 digit upscaled: averaged back down, it matches
        shrunk = torch.nn.functional.avg_pool2d(image[:1].float(), 4)[0].flatten()
        original = torch.from_numpy(digits.images[chosen[3]]).flatten()
        assert torch.corrcoef(torch.stack([shrunk, original]))[0, 1] > 0.9


def test_digits_without_scikit_learn_or_its_file_is_one_sentence(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sklearn" else real(name, *args))
    with pytest.raises(DataError, match="pip install scikit-learn"):
        sources._digits_data()
    elsewhere = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
    elsewhere.submodule_search_locations = [str(tmp_path)]  # a scikit-learn without the file
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: elsewhere if name == "sklearn" else real(name, *args))
    with pytest.raises(DataError, match="which this scikit-learn does not ship"):
        sources._digits_data()
