"""The training loop: components are built from the config, then one linear loop of
micro-steps (gradient accumulation), optimizer steps, logging, evaluation and checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

from conadv.adversarial.engine import auxiliary_routes, bn_routes, build_engine
from conadv.adversarial.streams import build_executor
from conadv.config import BatchPlan, RunConfig, plan_batch, to_yaml
from conadv.data import build_eval_loader, build_train_stream
from conadv.distributed import DistEnv, all_reduce_sum, detect_env, pick_device, process_group
from conadv.models import build_model
from conadv.models.multi_bn import bn_views, convert_to_multi_bn
from conadv.optim import build_optimizer, build_scheduler, scaled_lr
from conadv.telemetry import Telemetry, setup_logging
from conadv.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from conadv.train.evaluate import evaluate, robust_attacks
from conadv.train.preemption import StopRequest
from conadv.train.step_metrics import MetricWindow, StepResult

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
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32 (no autocast)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_factory(device: torch.device,
                     dtype: torch.dtype | None) -> Callable[[], AbstractContextManager]:
    """A no-argument factory of autocast contexts (a nullcontext for fp32). A plain function,
    not a bound method, so the engine holding it keeps no reference to the trainer."""
    if dtype is None:
        return nullcontext
    return partial(torch.autocast, device.type, dtype=dtype)


def _record_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


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
        routes = bn_routes(cfg.adv, cfg.data.second_view)
        if cfg.adv.enabled or auxiliary_routes(routes):
            # MultiBatchNorm also lets attacks run on batch statistics without touching
            # running statistics, so it is used whenever adversarial training is on.
            convert_to_multi_bn(self.model, auxiliary_routes(routes))
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
        self.autocast = autocast_factory(device, self.amp_dtype)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.executor = build_executor(cfg.adv.executor, device) if cfg.adv.enabled else None
        self.engine = build_engine(cfg.adv, cfg.data.second_view, self.model,
                                   self.plan.accumulation, self.executor, num_classes,
                                   cfg.train.seed, device, cfg.model.channels_last,
                                   self._build_mix(num_classes), self.autocast)

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
        self.engine.load_state_dict(mine["engine"])
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
        per_rank = {"stream": self.stream.state_dict(), "engine": self.engine.state_dict(),
                    "rng": rng_state(), "bad_images": self.bad_images}
        return self.checkpoints.save(self.step, shared, per_rank)

    def resolved_config(self) -> RunConfig:
        train = dataclasses.replace(self.cfg.train, per_device_batch=self.plan.per_device,
                                    accumulation=self.plan.accumulation)
        return dataclasses.replace(self.cfg, train=train)

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> StepResult:
        """One optimizer step over `accumulation` micro-batches."""
        accumulation = self.plan.accumulation
        result = StepResult(loss=torch.zeros((), device=self.device))
        timed = self.device.type == "cuda" and self.cfg.adv.enabled
        if timed:
            result.cuda_events["train_begin"] = _record_event()
        for micro in range(accumulation):
            while self.engine.wants_batch():  # ConAdv: fills the queue of future batches
                start = time.perf_counter()
                batch, key = self.stream.next()
                result.data_time += time.perf_counter() - start
                self.bad_images += int(batch["n_bad"].sum())
                self.engine.feed(batch, key, self.step)
            inputs = self.engine.take()
            result.attack_seconds += inputs.attack_seconds
            with self._no_sync(micro == accumulation - 1):
                with bn_views(self.model, self.engine.bn_plan(inputs)), self.autocast():
                    logits = self.ddp(inputs.images)
                loss, stats = self.engine.loss(self.criterion, logits, inputs)
                self.scaler.scale(loss / accumulation).backward()
            result.add(loss.detach(), stats, inputs, accumulation)
        self.engine.before_optimizer_step()  # the attacks that read these weights are done
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.engine.after_optimizer_step()  # later attacks read the new weights
        if timed:
            result.cuda_events["train_end"] = _record_event()
            launched = getattr(self.engine, "last_launched_events", None)
            if launched is not None:
                result.cuda_events["attack_begin"], result.cuda_events["attack_end"] = launched
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return result

    def run_eval(self, robust: bool = False) -> dict[str, float]:
        adv = self.cfg.adv
        attacks = (robust_attacks(adv.eval_epsilon, adv.eval_pgd_steps, adv.eval_step_size)
                   if robust else None)
        return evaluate(self.model, self.eval_loader, self.device, self.cfg.model.channels_last,
                        self.autocast, attacks, self.cfg.train.seed)

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
        window = MetricWindow(self.device)
        window_start = time.perf_counter()
        train_start, start_step = time.perf_counter(), self.step
        stop_request = StopRequest(self.run_dir, env.is_main)
        stop_reason = None
        try:
            while self.step < self.total_steps:
                window.add(self.train_step())
                telemetry.advance()
                done = self.step == self.total_steps
                logging_step = self.step % log_every == 0 or done
                if logging_step and not done and stop_request.agreed(self.device):
                    stop_reason = "stop requested (SIGUSR1 or a STOP file in the run directory)"
                if self.step == cfg.train.stop_at_step and not done:
                    stop_reason = "train.stop_at_step reached"
                if logging_step:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_start
                    telemetry.log("train", self.step, {
                        "epoch": round(self.stream.epoch_progress, 4),
                        "lr": self.scheduler.get_last_lr()[0], **window.record(env.world_size),
                        "img_per_s": window.steps * self.plan.global_batch / elapsed,
                        "step_time": elapsed / window.steps, "bad_images": self.bad_images})
                    window.reset()
                    window_start = time.perf_counter()
                if done or (eval_every and self.step % eval_every == 0):
                    result = self.run_eval(robust=done and cfg.adv.eval_robust)
                    telemetry.log("eval", self.step, {
                        "epoch": round(self.stream.epoch_progress, 4), **result})
                epoch_done = int(self.stream.epoch_progress) > last_saved_epoch
                every = cfg.checkpoint.every_steps
                if (done or stop_reason or (every and self.step % every == 0)
                        or (not every and epoch_done)):
                    self.save_checkpoint()
                    last_saved_epoch = int(self.stream.epoch_progress)
                if stop_reason:
                    log.info("stopping after step %d with a checkpoint: %s; resume with "
                             "checkpoint.resume=auto", self.step, stop_reason)
                    break
            if not result and self.step == self.total_steps:
                # resumed a finished run: nothing was trained, still report its accuracy
                result = self.run_eval(robust=cfg.adv.eval_robust)
        finally:
            stop_request.close()
            telemetry.close()
        train_time = time.perf_counter() - train_start
        bad_total = all_reduce_sum(torch.tensor(float(self.bad_images), device=self.device))
        kind = "vanilla"
        if cfg.adv.enabled:
            kind = f"ConAdv tau={cfg.adv.tau}" if cfg.adv.tau else "sequential adversarial (tau=0)"
        summary = {"training": kind, "steps": self.step,
                   "epochs": round(self.stream.epoch_progress, 4),
                   "global_batch": self.plan.global_batch, "world_size": env.world_size,
                   "train_time_s": round(train_time, 2),
                   "img_per_s": (self.step - start_step) * self.plan.global_batch
                   / max(train_time, 1e-9),
                   "bad_images": int(bad_total.item()),
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "finished": self.step == self.total_steps, "stop_reason": stop_reason,
                   "final_eval": result}
        telemetry.write_summary(summary)
        return summary
