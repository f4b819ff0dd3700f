"""Randomness from identity (conadv/randomness.py): the same sample, batch or evaluation image
gets the same draw whichever rank, micro-step, worker or restart draws it."""

import torch

from conadv.config import DataConfig
from conadv.data.loader import build_eval_loader, build_train_stream
from conadv.randomness import (
    attack_seed,
    batch_seed,
    evaluation_attack_seed,
    sample_seed,
    seeded,
)
from tests.helpers import CPU

DIGITS = DataConfig(name="digits", image_size=16, eval_resize=16, workers=0)


def _batches(world: int, accumulation: int, steps: int) -> dict[int, tuple]:
    """key -> (sample indices, first pixel row) of every micro-batch of every rank."""
    seen = {}
    for rank in range(world):
        stream = build_train_stream(DIGITS, world, rank, 8, accumulation, 3, CPU)
        stream.seek(2)  # a resume in the middle of the first epoch
        for _ in range(steps * accumulation):
            batch, key = stream.next()
            seen[key] = (batch["index"].tolist(), batch["image"][:, 0, 0].tolist())
    return seen


def test_a_batch_key_names_the_same_images_and_augmentation_on_every_layout():
    """One global batch of 32: 4 ranks x 1, 2 ranks x 2 micro-steps, 1 rank x 4."""
    layouts = [_batches(4, 1, 3), _batches(2, 2, 3), _batches(1, 4, 3)]
    assert layouts[0] == layouts[1] == layouts[2]
    assert len(layouts[0]) == 12


def test_keyed_draws_depend_on_the_key_alone():
    with seeded(batch_seed(3, 17, 1)):
        first = torch.rand(4)
    torch.rand(100)  # whatever else the process drew meanwhile
    with seeded(batch_seed(3, 17, 1)):
        again = torch.rand(4)
    assert torch.equal(first, again)
    with seeded(batch_seed(3, 18, 1)):
        assert not torch.equal(torch.rand(4), first)
    before = torch.get_rng_state()
    with seeded(5):
        torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())  # the process's generator is restored
    assert len({sample_seed(0, e, i) for e in range(3) for i in range(100)}) == 300
    assert len({attack_seed(0, k) for k in range(100)}) == 100
    assert evaluation_attack_seed(0, 0, 5) != evaluation_attack_seed(0, 1, 5)


def test_robust_evaluation_draws_follow_the_image_not_the_shard():
    from conadv.adversarial.attacks import draw_per_sample

    def starts(world):
        found = {}
        for rank in range(world):
            for batch in build_eval_loader(DIGITS, world, rank, 16, CPU):
                draws = draw_per_sample(batch["image"].shape, 10, batch["index"], 3, 1, CPU)
                found.update(zip(batch["index"].tolist(), draws.noise[:, 0, 0, 0].tolist()))
        return found

    assert starts(1) == starts(3)
