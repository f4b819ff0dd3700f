"""In a 2-process gloo job the attack makes no collective call; a training step does."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile

from conadv.adversarial.attacks import AttackSpec
from conadv.adversarial.engine import ConAdvEngine, ViewWeights
from conadv.adversarial.streams import SequentialExecutor
from conadv.models.factory import CifarResNet, ImageClassifier
from conadv.models.multi_bn import bn_views, convert_to_multi_bn

COLLECTIVE_WORDS = ("all_reduce", "allreduce", "broadcast", "all_gather", "allgather",
                    "reduce_scatter", "barrier", "gloo:")


def count_collectives(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events()
               if any(word in e.name.lower() for word in COLLECTIVE_WORDS))


def _rank_main(rank: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = convert_to_multi_bn(ImageClassifier(CifarResNet(10, width=4)), ["adv"])
        ddp = DistributedDataParallel(model)
        engine = ConAdvEngine(model, AttackSpec(steps=3), tau=1, accumulation=1,
                              executor=SequentialExecutor(), num_classes=10, seed=0,
                              device=torch.device("cpu"), channels_last=False,
                              weights=ViewWeights(), routes={"clean": "main", "adv": "adv"})
        gen = torch.Generator().manual_seed(rank)
        x = torch.rand(8, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)

        attack_calls = count_collectives(lambda: engine.make_adversarial(model, x, y, key=rank))
        grads_after_attack = [p.grad for p in model.parameters()]

        def train_step():
            with bn_views(model, [("main", 8)]):
                ddp(x).sum().backward()

        train_calls = count_collectives(train_step)
        queue.put((rank, attack_calls, train_calls, all(g is None for g in grads_after_attack)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_attack_makes_no_collective_call(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "init"), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, attack_calls, train_calls, no_grads in results:
        assert attack_calls == 0, f"rank {rank}: the attack made {attack_calls} collective calls"
        assert train_calls > 0  # the counter does see DDP's gradient all-reduce
        assert no_grads  # and the attack wrote no .grad
