"""Exact evaluation over 3 gloo ranks of a 10-sample set (no padding duplicates)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conadv.data.dataset import ViewDataset
from conadv.data.sampler import ExactShardSampler
from conadv.data.sources import SyntheticSource
from conadv.models.factory import CifarResNet, ImageClassifier
from conadv.train.evaluate import evaluate


def _loader(world: int, rank: int):
    dataset = ViewDataset(SyntheticSource(10, num_classes=7, image_size=8), None)
    return torch.utils.data.DataLoader(dataset, batch_size=3,
                                       sampler=ExactShardSampler(10, world, rank))


def _model():
    torch.manual_seed(0)
    return ImageClassifier(CifarResNet(7, width=4)).eval()


def _rank_main(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        queue.put((rank, evaluate(_model(), _loader(world, rank), torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_three_ranks_count_ten_samples_and_match_one_rank(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 3, str(tmp_path / "init"), queue))
             for r in range(3)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = evaluate(_model(), _loader(1, 0), torch.device("cpu"))
    assert single["count"] == 10
    for rank in range(3):
        assert results[rank]["count"] == 10
        assert results[rank]["top1"] == pytest.approx(single["top1"], abs=1e-9)
        assert results[rank]["top5"] == pytest.approx(single["top5"], abs=1e-9)
        assert results[rank]["loss"] == pytest.approx(single["loss"], rel=1e-5)
