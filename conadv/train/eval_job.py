"""Evaluate (and optionally export) a trained checkpoint: the body of `conadv-eval`."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from conadv.checkpoints.format import (
    load_state,
    load_state_everywhere,
    resolve_checkpoint,
    resolve_checkpoint_everywhere,
)
from conadv.config import RunConfig, load_config, parse_saved_config, plan_job
from conadv.data import build_eval_loader
from conadv.data.device import batch_to_device
from conadv.data.loader import build_source, check_data
from conadv.distributed import detect_env, pick_device, process_group
from conadv.errors import CheckpointError, ConfigError, collapsed
from conadv.models import build_model, check_arch, export_state_dict
from conadv.models.multi_bn import main_state_dict
from conadv.models.onnx_export import export_onnx
from conadv.telemetry import setup_logging
from conadv.train.evaluate import autoattack, evaluate, robust_attacks
from conadv.train.runtime import autocast_dtype, autocast_factory
from conadv.train.sharpness import model_sharpness


def evaluation_config(config: Path | None, overrides: list[str], checkpoint: Path) -> RunConfig:
    """The given config file, or else the config the checkpoint was trained with (its run
    directory's config.yaml, or the copy inside the checkpoint), with `overrides` on top."""
    if config is not None:
        return load_config(config, overrides)
    resolved = resolve_checkpoint(checkpoint)
    beside = resolved.parent.parent / "config.yaml"
    if beside.is_file():
        text, where = beside.read_text(encoding="utf-8", errors="replace"), str(beside)
    else:
        text, where = load_state(resolved)["config"], f"the config inside {resolved}"
    return load_config(None, overrides, base=parse_saved_config(text, where))


def check_export(path: Path | None, force: bool, option: str = "--export") -> None:
    """Refuse an export path that cannot be written, or would replace a file, before any
    work."""
    if path is None:
        return
    if path.is_symlink():  # writing would follow it to wherever it points, even dangling
        raise ConfigError(f"{option} {path} is a symbolic link (to {os.readlink(path)}); give "
                          "the path of the file itself")
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"the directory of {option} {path} does not exist")
    if path.exists() and not force:
        raise ConfigError(f"{option} {path} exists; add --force to replace it")


def run_evaluation(cfg: RunConfig, checkpoint: Path, export_to: Path | None = None,
                   robust: bool = False, ema: bool = False, onnx_to: Path | None = None,
                   autoattack_images: int = 0, sharpness_images: int = 0,
                   sharpness_rho: float = 5e-4) -> dict[str, Any]:
    """Clean top-1/top-5 of a checkpoint (exact across ranks) and, with `robust`, top-1 under
    FGSM and PGD-k at eval.epsilon; of its weight EMA instead of its weights with `ema` (the
    exports then hold the EMA too). `onnx_to`: also the inference model as ONNX, checked
    with onnxruntime (rank 0). `autoattack_images`: also AutoAttack's accuracy at
    eval.epsilon on that many validation images (chosen by train.seed, the same images on
    any number of ranks), beside clean, FGSM and PGD accuracy on the same images.
    `sharpness_images`: also the flatness of the training loss on that many training images
    (conadv.train.sharpness; computed by each rank alone, reported by rank 0)."""
    check_data(cfg.data)  # the names the factories own, before any rank joins (no optimizer
    check_arch("model.arch", cfg.model.arch)  # here: a custom one of the training is fine)
    env = detect_env()
    setup_logging(env.is_main)
    device = pick_device(cfg.train.device, env, cfg.dist.backend)
    with process_group(env, device, cfg.dist.backend, cfg.dist.timeout_s):
        path = resolve_checkpoint_everywhere(checkpoint)
        # a run directory's config.yaml pins the training split of its world size; evaluation
        # only borrows the per-device batch, on any number of ranks
        per_device = (cfg.train.per_device_batch
                      or plan_job(cfg, env.world_size, attack_ranks=False).batch.per_device)
        num_classes = cfg.model.num_classes or build_source(cfg.data, "val").num_classes
        model = build_model(cfg.model, num_classes).to(device)
        saved = load_state_everywhere(path, device)
        if ema and "ema" not in saved:
            raise ConfigError(f"checkpoint {path} holds no weight EMA (it was trained with "
                              "train.ema_decay=0); evaluate it without --ema")
        state = saved["ema"].get("weights") if ema else saved["model"]
        try:
            model.load_state_dict(main_state_dict(state))  # main BN only
        except (RuntimeError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {path} does not hold weights of this model "
                                  f"({collapsed(err)})") from None
        if export_to is not None and env.is_main:
            torch.save(export_state_dict(model), export_to)
        onnx_difference = None
        if onnx_to is not None and env.is_main:
            onnx_difference = export_onnx(copy.deepcopy(model), onnx_to, cfg.data.eval_crop)
        loader = build_eval_loader(cfg.data, env.world_size, env.rank, per_device, device)
        autocast = autocast_factory(device, autocast_dtype(cfg.train.precision, device))
        attacks = robust_attacks(cfg.eval) if robust else None
        result = evaluate(model, loader, device, cfg.model.channels_last, autocast, attacks,
                          cfg.train.seed)
        if autoattack_images:
            subset = build_eval_loader(cfg.data, env.world_size, env.rank, per_device, device,
                                       subset=autoattack_images, seed=cfg.train.seed)
            worst = {**robust_attacks(cfg.eval), "autoattack": autoattack(
                model, cfg.eval.epsilon, num_classes, cfg.train.seed)}
            result["autoattack"] = evaluate(model, subset, device, cfg.model.channels_last,
                                            autocast, worst, cfg.train.seed)
        if sharpness_images:
            seen = build_eval_loader(cfg.data, 1, 0, per_device, device, split="train",
                                     subset=sharpness_images, seed=cfg.train.seed)
            batches = [(moved["image"], moved["label"]) for moved in
                       (batch_to_device(batch, device, cfg.model.channels_last)
                        for batch in seen)]
            result["sharpness"] = model_sharpness(model, batches, rho=sharpness_rho)
    extra = ({"onnx": str(onnx_to), "onnx_max_logit_difference": onnx_difference}
             if onnx_difference is not None else {})
    return {"checkpoint": str(path), "weights": "ema" if ema else "model", **result, **extra}
