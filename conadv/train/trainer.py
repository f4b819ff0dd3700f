"""The training loop: components are built from the config, then one linear loop of
micro-steps (gradient accumulation), optimizer steps, logging, evaluation and checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

from conadv.config import BatchPlan, RunConfig, plan_batch, to_yaml
from conadv.data import build_eval_loader, build_train_stream
from conadv.data.device import batch_to_device
from conadv.distributed import DistEnv, all_reduce_sum, detect_env, pick_device, process_group
from conadv.models import build_model
from conadv.optim import build_optimizer, build_scheduler, scaled_lr
from conadv.telemetry import Telemetry, setup_logging
from conadv.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from conadv.train.evaluate import evaluate

log = logging.getLogger(__name__)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run a whole training job in this process (one rank of it under torchrun or Slurm).
    Returns the run summary on rank 0 and {} elsewhere."""
    env = detect_env()
    setup_logging(env.is_main)
    device = pick_device(cfg.train.device, env)
    with process_group(env, device, cfg.dist.backend, cfg.dist.timeout_s):
        summary = Trainer(cfg, env, device).fit()
    return summary if env.is_main else {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32 (no autocast)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, device: torch.device) -> None:
        self.cfg, self.env, self.device = cfg, env, device
        self.plan: BatchPlan = plan_batch(cfg.train, env.world_size)
        self.run_dir = Path(cfg.log.run_dir)
        configure_determinism(cfg.train.deterministic)
        seed_everything(cfg.train.seed)  # identical model init on every rank

        pin = device.type == "cuda"
        self.stream = build_train_stream(cfg.data, env.world_size, env.rank,
                                         self.plan.per_device, cfg.train.seed, pin)
        self.eval_loader = build_eval_loader(cfg.data, env.world_size, env.rank,
                                             self.plan.per_device, pin)
        num_classes = cfg.model.num_classes or self.stream.num_classes
        self.model = build_model(cfg.model, num_classes).to(device)
        self.ddp: nn.Module = self.model
        if env.is_distributed:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)

        self.steps_per_epoch = self.stream.batches_per_epoch / self.plan.accumulation
        self.total_steps = cfg.train.max_steps or max(
            1, int(cfg.train.epochs * self.steps_per_epoch))
        peak_lr = scaled_lr(cfg.optim.lr, cfg.optim.scale_rule, self.plan.global_batch,
                            cfg.optim.base_batch)
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.optim, peak_lr)
        self.scheduler, self.schedule = build_scheduler(
            self.optimizer, cfg.schedule, peak_lr, self.steps_per_epoch, self.total_steps)
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.mix = self._build_mix(num_classes)

        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints",
                                             cfg.checkpoint.keep_last, env.rank, env.world_size)
        self.step = 0
        self.bad_images = 0
        # Random ops inside the loop (mixup, cutmix) differ per rank; init above did not.
        torch.manual_seed(cfg.train.seed + 1 + env.rank)
        self.resumed_from = self._resume()

    # ------------------------------------------------------------------ building blocks
    def _build_mix(self, num_classes: int) -> v2.Transform | None:
        t = self.cfg.train
        options = []
        if t.mixup_alpha > 0:
            options.append(v2.MixUp(alpha=t.mixup_alpha, num_classes=num_classes))
        if t.cutmix_alpha > 0:
            options.append(v2.CutMix(alpha=t.cutmix_alpha, num_classes=num_classes))
        if not options:
            return None
        return options[0] if len(options) == 1 else v2.RandomChoice(options)

    def autocast(self) -> AbstractContextManager:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _no_sync(self, last_micro_step: bool) -> AbstractContextManager:
        """Gradient all-reduce only on the last micro-step of an accumulation."""
        if last_micro_step or not isinstance(self.ddp, DistributedDataParallel):
            return nullcontext()
        return self.ddp.no_sync()

    # ------------------------------------------------------------------ state
    def _resume(self) -> Path | None:
        path = self.checkpoints.find_resume(self.cfg.checkpoint.resume)
        if path is None:
            return None
        shared, mine = self.checkpoints.load(path)
        self.model.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        self.scaler.load_state_dict(shared["scaler"])
        self.step = shared["step"]
        self.stream.load_state_dict(mine["stream"])
        self.bad_images = mine["bad_images"]
        set_rng_state(mine["rng"])
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def save_checkpoint(self) -> Path:
        shared = None
        if self.env.is_main:
            shared = {"model": self.model.state_dict(),
                      "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(),
                      "scaler": self.scaler.state_dict(), "step": self.step,
                      "config": to_yaml(self.resolved_config())}
        per_rank = {"stream": self.stream.state_dict(), "rng": rng_state(),
                    "bad_images": self.bad_images}
        return self.checkpoints.save(self.step, shared, per_rank)

    def resolved_config(self) -> RunConfig:
        train = dataclasses.replace(self.cfg.train, per_device_batch=self.plan.per_device,
                                    accumulation=self.plan.accumulation)
        return dataclasses.replace(self.cfg, train=train)

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over `accumulation` micro-batches.
        Returns (mean loss as a device tensor, seconds spent waiting for data)."""
        accumulation = self.plan.accumulation
        loss_sum = torch.zeros((), device=self.device)
        data_time = 0.0
        for micro in range(accumulation):
            start = time.perf_counter()
            batch = self.stream.next()
            data_time += time.perf_counter() - start
            self.bad_images += int(batch["n_bad"].sum())
            inputs = batch_to_device(batch, self.device, self.cfg.model.channels_last)
            x, y = inputs["image"], inputs["label"]
            if self.mix is not None:
                x, y = self.mix(x, y)
            with self._no_sync(micro == accumulation - 1):
                with self.autocast():
                    loss = self.criterion(self.ddp(x), y)
                self.scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return loss_sum / accumulation, data_time

    def run_eval(self) -> dict[str, float]:
        return evaluate(self.model, self.eval_loader, self.device, self.cfg.model.channels_last,
                        self.autocast)

    def fit(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        telemetry = Telemetry(self.run_dir, env.is_main, cfg.log.tensorboard, cfg.log.progress,
                              self.total_steps, self.step)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.resolved_config()))
            log.info("training %s on %s: %d steps, global batch %d = %d per device x %d ranks "
                     "x %d accumulation, %s", cfg.model.arch, cfg.data.name, self.total_steps,
                     self.plan.global_batch, self.plan.per_device, env.world_size,
                     self.plan.accumulation, self.device)
        eval_every = round(cfg.train.eval_every_epochs * self.steps_per_epoch)
        log_every = cfg.log.every_steps
        last_saved_epoch = int(self.stream.epoch_progress)
        result: dict[str, float] = {}
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_data, window_start = 0, 0.0, time.perf_counter()
        train_start, start_step = time.perf_counter(), self.step
        try:
            while self.step < self.total_steps:
                loss, data_time = self.train_step()
                window_loss += loss
                window_steps += 1
                window_data += data_time
                telemetry.advance()
                done = self.step == self.total_steps
                if self.step % log_every == 0 or done:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_start
                    mean_loss = all_reduce_sum(window_loss.clone()) / (
                        window_steps * env.world_size)
                    telemetry.log("train", self.step, {
                        "epoch": round(self.stream.epoch_progress, 4),
                        "lr": self.scheduler.get_last_lr()[0], "loss": mean_loss.item(),
                        "img_per_s": window_steps * self.plan.global_batch / elapsed,
                        "data_time": window_data / window_steps,
                        "step_time": elapsed / window_steps, "bad_images": self.bad_images})
                    window_loss.zero_()
                    window_steps, window_data, window_start = 0, 0.0, time.perf_counter()
                if done or (eval_every and self.step % eval_every == 0):
                    result = self.run_eval()
                    telemetry.log("eval", self.step, {
                        "epoch": round(self.stream.epoch_progress, 4), **result})
                epoch_done = int(self.stream.epoch_progress) > last_saved_epoch
                every = cfg.checkpoint.every_steps
                stopping = self.step == cfg.train.stop_at_step and not done
                if (done or stopping or (every and self.step % every == 0)
                        or (not every and epoch_done)):
                    self.save_checkpoint()
                    last_saved_epoch = int(self.stream.epoch_progress)
                if stopping:
                    log.info("stopping at step %d as asked (train.stop_at_step); resume with "
                             "checkpoint.resume=auto", self.step)
                    break
            if not result and self.step == self.total_steps:
                # resumed a finished run: nothing was trained, still report its accuracy
                result = self.run_eval()
        finally:
            telemetry.close()
        train_time = time.perf_counter() - train_start
        bad_total = all_reduce_sum(torch.tensor(float(self.bad_images), device=self.device))
        summary = {"steps": self.step, "epochs": round(self.stream.epoch_progress, 4),
                   "global_batch": self.plan.global_batch, "world_size": env.world_size,
                   "train_time_s": round(train_time, 2),
                   "img_per_s": (self.step - start_step) * self.plan.global_batch
                   / max(train_time, 1e-9),
                   "bad_images": int(bad_total.item()),
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "finished": self.step == self.total_steps,
                   "final_eval": result}
        telemetry.write_summary(summary)
        return summary
