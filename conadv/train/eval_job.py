"""Evaluate (and optionally export) a trained checkpoint: the body of `conadv-eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conadv.config import RunConfig, plan_batch
from conadv.data import build_eval_loader
from conadv.data.loader import build_source
from conadv.distributed import detect_env, pick_device, process_group
from conadv.models import build_model, export_state_dict
from conadv.models.multi_bn import main_state_dict
from conadv.telemetry import setup_logging
from conadv.train.checkpoint import load_model_weights, resolve_checkpoint
from conadv.train.evaluate import evaluate, robust_attacks
from conadv.train.runtime import autocast_dtype, autocast_factory


def run_evaluation(cfg: RunConfig, checkpoint: Path, export_to: Path | None = None,
                   robust: bool = False) -> dict[str, Any]:
    """Clean top-1/top-5 of a checkpoint (exact across ranks) and, with `robust`, top-1 under
    FGSM and PGD-k at adv.eval_epsilon."""
    env = detect_env()
    setup_logging(env.is_main)
    device = pick_device(cfg.train.device, env, cfg.dist.backend)
    with process_group(env, device, cfg.dist.backend, cfg.dist.timeout_s):
        path = resolve_checkpoint(checkpoint)
        # a run directory's config.yaml pins the training split of its world size; evaluation
        # only borrows the per-device batch, on any number of ranks
        per_device = (cfg.train.per_device_batch
                      or plan_batch(cfg.train, env.world_size).per_device)
        num_classes = cfg.model.num_classes or build_source(cfg.data, "val").num_classes
        model = build_model(cfg.model, num_classes).to(device)
        model.load_state_dict(main_state_dict(load_model_weights(path)))  # main BN only
        if export_to is not None and env.is_main:
            torch.save(export_state_dict(model), export_to)
        loader = build_eval_loader(cfg.data, env.world_size, env.rank, per_device,
                                   device.type == "cuda")
        autocast = autocast_factory(device, autocast_dtype(cfg.train.precision, device))
        attacks = robust_attacks(cfg.adv) if robust else None
        result = evaluate(model, loader, device, cfg.model.channels_last, autocast, attacks,
                          cfg.train.seed)
    return {"checkpoint": str(path), **result}
