"""In a 2-process gloo job the attack makes no collective call; a training step does."""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from conadv.adversarial.engine import EngineContext, build_engine
from conadv.config import AdvConfig
from conadv.models.factory import CifarResNet, ImageClassifier
from conadv.models.multi_bn import bn_views
from tests.helpers import (
    count_collectives,
    run_gloo_ranks,
)


def _count_on_rank(rank: int, world: int) -> tuple[int, int, bool]:
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(10, width=4))
    engine = build_engine(AdvConfig(enabled=True, tau=1, steps=3), model,
                          EngineContext(device=torch.device("cpu"), num_classes=10, seed=0))
    ddp = DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(rank)
    x = torch.rand(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)

    attack_calls = count_collectives(lambda: engine.make_adversarial(model, x, y, key=rank))
    grads_after_attack = [p.grad for p in model.parameters()]

    def train_step():
        with bn_views(model, [("main", 8)]):
            ddp(x).sum().backward()

    train_calls = count_collectives(train_step)
    return attack_calls, train_calls, all(g is None for g in grads_after_attack)


@pytest.mark.slow
def test_attack_makes_no_collective_call(tmp_path):
    results = run_gloo_ranks(2, _count_on_rank, tmp_path)
    for rank, (attack_calls, train_calls, no_grads) in results.items():
        assert attack_calls == 0, f"rank {rank}: the attack made {attack_calls} collective calls"
        assert train_calls > 0  # the counter does see DDP's gradient all-reduce
        assert no_grads  # and the attack wrote no .grad
