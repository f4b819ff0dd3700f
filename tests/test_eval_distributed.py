"""Exact evaluation over 3 gloo ranks of a 10-sample set (no padding duplicates), clean and
under attack."""

import pytest
import torch

from conadv.config import EvalConfig
from conadv.data.dataset import ViewDataset
from conadv.data.sampler import ExactShardSampler
from conadv.data.sources import SyntheticSource
from conadv.models.factory import CifarResNet, ImageClassifier
from conadv.train.evaluate import evaluate, robust_attacks
from tests.helpers import run_gloo_ranks

ATTACKS = robust_attacks(EvalConfig(epsilon=8 / 255, pgd_steps=3, step_size=2 / 255))


class ModelLabels(SyntheticSource):
    """Noise images labelled with the test model's own predictions, so clean accuracy is 100%
    and accuracy under attack lies in between: the robust counts are worth comparing."""

    def __init__(self) -> None:
        super().__init__(10, num_classes=7, image_size=8)
        with torch.no_grad():
            images = torch.stack([self.load(i) for i in range(10)]).float() / 255
            self.labels = _model()(images).argmax(dim=1).tolist()

    def label(self, index: int) -> int:
        return self.labels[index]


def _loader(world: int, rank: int):
    dataset = ViewDataset(ModelLabels(), None)
    return torch.utils.data.DataLoader(dataset, batch_size=3,
                                       sampler=ExactShardSampler(10, world, rank))


def _model():
    torch.manual_seed(0)
    return ImageClassifier(CifarResNet(7, width=4)).eval()


def _evaluate_on_rank(rank: int, world: int) -> dict:
    return evaluate(_model(), _loader(world, rank), torch.device("cpu"), attacks=ATTACKS)


@pytest.mark.slow
def test_three_ranks_count_ten_samples_and_match_one_rank(tmp_path):
    results = run_gloo_ranks(3, _evaluate_on_rank, tmp_path)
    single = evaluate(_model(), _loader(1, 0), torch.device("cpu"), attacks=ATTACKS)
    assert single["count"] == 10 and single["top1"] == 100.0
    assert single["pgd3_top1"] < 100.0  # the attack does change some predictions
    for rank in range(3):
        assert results[rank]["count"] == 10
        assert results[rank]["top1"] == pytest.approx(single["top1"], abs=1e-9)
        assert results[rank]["top5"] == pytest.approx(single["top5"], abs=1e-9)
        assert results[rank]["loss"] == pytest.approx(single["loss"], rel=1e-5)
        # attack randomness is seeded per image, so robust accuracy does not depend on sharding
        assert results[rank]["fgsm_top1"] == single["fgsm_top1"]
        assert results[rank]["pgd3_top1"] == single["pgd3_top1"]
