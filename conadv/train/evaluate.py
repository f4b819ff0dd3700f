"""Evaluation, exact across ranks (every validation image is counted once): clean top-1/top-5
and, optionally, accuracy under attacks (main BatchNorm, running statistics)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from conadv.adversarial import AttackSpec, draw_per_sample, perturb
from conadv.config import EvalConfig
from conadv.data.device import batch_to_device
from conadv.distributed import all_reduce_sum
from conadv.errors import ConfigError


def robust_attacks(cfg: EvalConfig) -> dict[str, AttackSpec]:
    """The standard untargeted evaluation attacks at eval.epsilon: FGSM from the clean
    image, PGD-k from a random start."""
    eps, steps = cfg.epsilon, cfg.pgd_steps
    return {"fgsm": AttackSpec(eps, eps, 1, 0.0, targeted=False),
            f"pgd{steps}": AttackSpec(eps, cfg.step_size, steps, 1.0, targeted=False)}


def autoattack(model: nn.Module, epsilon: float, num_classes: int,
               seed: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """AutoAttack (Croce & Hein, ICML 2020), standard version (APGD-CE, APGD-T, FAB-T, Square
    with 5,000 queries), L-inf at `epsilon`, through torchattacks' implementation. It is
    installed without its dependencies (`pip install --no-deps torchattacks`, as `make`
    does): it pins requests~=2.25.1, which would downgrade requests for every other package,
    and what it imports (numpy, scipy, tqdm) conadv has anyway. torchattacks seeds its random
    starts per batch (and reseeds the global generators), so the subset is the same on any
    number of ranks but AutoAttack's accuracy on it may differ by an image or two between
    layouts, unlike conadv's per-image seeded attacks; evaluate it in one process to compare."""
    try:
        import torchattacks
    except ImportError:
        raise ConfigError("--autoattack needs torchattacks: pip install --no-deps "
                          "torchattacks") from None
    if num_classes < 10:  # APGD-T and FAB-T target the 9 most likely wrong classes
        raise ConfigError(f"--autoattack's standard version needs at least 10 classes; this "
                          f"model has {num_classes}")
    return torchattacks.AutoAttack(model, norm="Linf", eps=epsilon, version="standard",
                                   n_classes=num_classes, seed=seed)


def final_eval_attacks(cfg: EvalConfig) -> dict[str, AttackSpec] | None:
    """The attacks of a run's final evaluation: the robust ones when eval.robust is set."""
    return robust_attacks(cfg) if cfg.robust else None


def evaluate(model: nn.Module, loader, device: torch.device, channels_last: bool = False,
             autocast: Callable[[], AbstractContextManager] | None = None,
             attacks: dict[str, AttackSpec | Callable] | None = None,
             seed: int = 0) -> dict[str, float]:
    """top-1 / top-5 accuracy (percent), mean loss and count, summed over all ranks; with
    `attacks` (specs of conadv's attack, or callables images, labels -> adversarial images),
    also `<name>_top1` under each attack. Items marked valid=0 (unreadable files)
    are left out of every number and counted as `unreadable`."""
    attacks = attacks or {}
    was_training = model.training
    model.eval()
    # correct@1, correct@5, summed loss, count, unreadable, then correct@1 per attack; float64
    # stays exact
    sums = torch.zeros(5 + len(attacks), dtype=torch.float64, device=device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if autocast is None:
            return model(x)
        with autocast():
            return model(x)

    for batch in loader:
        moved = batch_to_device(batch, device, channels_last)  # waits for a GPU-made batch
        x, y = moved["image"], moved["label"]
        valid = batch["valid"].to(device) if "valid" in batch else torch.ones_like(y)
        with torch.no_grad():
            logits = forward(x).float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(y[:, None]) & valid[:, None].bool()
        losses = F.cross_entropy(logits, y, reduction="none") * valid
        row = [hits[:, 0].sum(), hits.any(dim=1).sum(), losses.sum(), valid.sum(),
               (1 - valid).sum()]
        for a, spec in enumerate(attacks.values()):
            if callable(spec):  # an attack of its own (AutoAttack): images, labels -> images
                adv = spec(x.float(), y)
            else:
                # seeded per image, so robust accuracy does not depend on how ranks shard
                draws = draw_per_sample(x.shape, logits.shape[1], batch["index"], seed, a,
                                        device)
                adv = perturb(forward, x, y, spec, logits.shape[1], draws=draws)
            with torch.no_grad():
                row.append(((forward(adv).argmax(dim=1) == y) & valid.bool()).sum())
        sums += torch.stack([v.double() for v in row])
    all_reduce_sum(sums)
    model.train(was_training)
    values = sums.tolist()
    count = max(values[3], 1.0)
    result = {"top1": 100.0 * values[0] / count, "top5": 100.0 * values[1] / count,
              "loss": values[2] / count, "count": int(values[3])}
    if values[4]:
        result["unreadable"] = int(values[4])
    for name, correct in zip(attacks, values[5:]):
        result[f"{name}_top1"] = 100.0 * correct / count
    return result
