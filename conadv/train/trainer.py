"""The training loop: components are built from the config, then one linear loop of
micro-steps (gradient accumulation), optimizer steps, logging, evaluation and checkpoints.
A process's role in the job (trainer, trainer beside attack ranks, attack rank) is
conadv/train/job.py's."""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conadv.checkpoints.format import list_checkpoints, load_state_everywhere
from conadv.config import (
    BatchPlan,
    RunConfig,
    flat_config,
    parse_saved_config,
    plan_job,
    to_yaml,
    trajectory_changes,
)
from conadv.data import build_eval_loader
from conadv.data.loader import choose_loader
from conadv.distributed import (
    DistEnv,
    broadcast_buffers,
    broadcast_object,
    compress_gradients,
    trainer_env,
    trainers_group,
)
from conadv.errors import ConfigError, DataError
from conadv.optim import build_optimizer, build_scheduler, scaled_lr
from conadv.report import build_report
from conadv.streams import DeviceStreams, streams_for, wait_for_current_stream
from conadv.telemetry import Telemetry
from conadv.trackers import Trackers
from conadv.train.cadence import Cadence
from conadv.train.checkpoint import CheckpointManager, host_copy
from conadv.train.ema import WeightEma
from conadv.train.evaluate import evaluate, final_eval_attacks
from conadv.train.nonfinite import NonFiniteGuard
from conadv.train.objectives import build_objective
from conadv.train.parts import build_training_parts, train_stream
from conadv.train.preemption import StopRequest, slurm_attempt
from conadv.train.run_directory import claim_on_rank_zero, drop_records_after
from conadv.train.runtime import compiler, configure_determinism, seed_everything
from conadv.train.state import OptimizerState, Progress, RunState
from conadv.train.step_metrics import MetricWindow, StepResult

if TYPE_CHECKING:
    from conadv.adversarial.attack_ranks import AttackLink

log = logging.getLogger(__name__)


def _record_event(streams: DeviceStreams) -> Any:
    """A timing event on the current stream (the overlap measurement)."""
    event = streams.new_event(timing=True)
    event.record(streams.current())
    return event


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, device: torch.device,
                 attack_link: AttackLink | None = None) -> None:
        """`env`: the whole job; `attack_link`: the trainers' end of its attack ranks, if any
        (handed to the engine's executor)."""
        job = plan_job(cfg, env.world_size)
        env = trainer_env(env, job.trainers)  # the trainers' view of the job
        self.cfg, self.env, self.device = cfg, env, device
        self.streams = streams_for(device)  # None on the CPU (unless a test stands in)
        self.plan: BatchPlan = job.batch
        compile_model = compiler(cfg.train.compile, cfg.train.compile_mode, device)
        self.run_dir = Path(cfg.log.run_dir)
        configure_determinism(cfg.train.deterministic)
        seed_everything(cfg.train.seed)  # identical model init on every rank
        # the run directory is checked, locked and identified before anything is written
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints",
                                             cfg.checkpoint.keep_last, env.is_main)
        self._lock, self.run_id, resume_path = claim_on_rank_zero(
            env.is_main, self.run_dir, self.checkpoints, cfg)
        if self._lock is not None:
            weakref.finalize(self, self._lock.release)
        self.checkpoints.run_id = self.run_id
        self.checkpoints.remove_leftovers()

        self.stream = train_stream(cfg, self.plan, env.rank, device)
        self.eval_loader = build_eval_loader(cfg.data, env.world_size, env.rank,
                                             self.plan.per_device, device)
        self.train_eval_loader = None
        if cfg.train.eval_train_images:
            self.train_eval_loader = build_eval_loader(
                cfg.data, env.world_size, env.rank, self.plan.per_device, device, split="train",
                subset=cfg.train.eval_train_images, seed=cfg.train.seed)
        num_classes = cfg.model.num_classes or self.stream.num_classes
        if num_classes < 2:  # and a targeted attack has no wrong label to draw
            raise DataError(f"the training set has {num_classes} class; a classifier needs "
                            "at least 2 (data.root's train/ holds one folder per class)")
        parts = build_training_parts(cfg, self.plan, num_classes, device,
                                     init_from=resume_path is None, attack_link=attack_link)
        self.model, self.engine, self.autocast = parts.model, parts.engine, parts.autocast
        self.ema = (WeightEma(self.model, cfg.train.ema_decay, cfg.train.ema_every_steps,
                              cfg.train.ema_warmup) if cfg.train.ema_decay else None)
        self.ddp: nn.Module = self.model
        if env.is_distributed:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                process_group=trainers_group())
            compress_gradients(self.ddp, cfg.dist.grad_compression, trainers_group())
        # the training forward; the plain module stays for evaluation and checkpoints
        self.train_forward = compile_model(self.ddp) if compile_model else self.ddp

        self.steps_per_epoch = self.stream.steps_per_epoch
        self.total_steps = cfg.train.max_steps or max(
            1, int(cfg.train.epochs * self.steps_per_epoch))
        self.peak_lr = scaled_lr(cfg.optim.lr, cfg.optim.scale_rule, self.plan.global_batch,
                                 cfg.optim.base_batch)
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.optim, self.peak_lr)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=parts.amp_dtype == torch.float16)
        self.objective = build_objective(cfg, num_classes, device)
        self.optimizers = [self.optimizer, *self.objective.optimizers]
        self.final_attacks = final_eval_attacks(cfg.eval)
        # fp16: the GradScaler handles overflowing gradients itself; only the loss counts
        self.guard = NonFiniteGuard(device, cfg.train.on_nonfinite,
                                    check_gradients=not self.scaler.is_enabled(),
                                    buffers=list(self.model.buffers()),
                                    max_skipped_steps=cfg.train.max_skipped_steps)

        self.progress = Progress(device, env.is_main, env.world_size,
                                 len(parts.teachers.teachers) if parts.teachers else 0)
        self.state = RunState()  # everything a checkpoint saves and restores, in one place
        self.state.register("model", self.model)
        self.state.register("optimizer", OptimizerState(self.optimizer))
        self.state.register("scaler", self.scaler)
        self.state.register("engine", self.engine)
        self.state.register("progress", self.progress)
        teachers = parts.teachers
        if teachers is not None:  # which teachers (file checksums), never their weights
            self.state.register("teachers", teachers)
        for name, part in self.objective.checkpointed().items():
            self.state.register(name, part)
        if self.ema is not None:
            self.state.register("ema", self.ema)
        self.resumed_from = self._resume(resume_path)
        # derived from the config and the step, never restored
        self.scheduler, self.schedule = build_scheduler(
            self.optimizer, cfg.schedule, self.peak_lr, self.steps_per_epoch, self.total_steps,
            start_step=self.step)
        self.stream.seek(self.step)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.progress.step

    @property
    def epoch_progress(self) -> float:
        """Epochs trained, fractional."""
        return self.step / self.steps_per_epoch

    # ------------------------------------------------------------------ building blocks
    def _no_sync(self, last_micro_step: bool) -> AbstractContextManager:
        """Gradient all-reduce only on the last micro-step of an accumulation."""
        if last_micro_step or not isinstance(self.ddp, DistributedDataParallel):
            return nullcontext()
        return self.ddp.no_sync()

    # ------------------------------------------------------------------ state
    def release_run_directory(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _resume(self, path: Path | None) -> Path | None:
        if path is None:
            return None
        saved = load_state_everywhere(path, self.device)
        own = self.model.state_dict()
        resized = [k for k, v in saved["model"].items() if k in own and v.shape != own[k].shape]
        if resized:
            k = resized[0]
            raise ConfigError(
                f"checkpoint {path} holds a model of another shape ({len(resized)} tensors "
                f"differ, e.g. {k}: {tuple(saved['model'][k].shape)} there, "
                f"{tuple(own[k].shape)} here); a changed architecture cannot continue a run: "
                f"start a new log.run_dir with model.init_from={path} model.init_strict=false")
        changes = trajectory_changes(
            parse_saved_config(saved["config"], f"the config inside {path}"), self.cfg)
        described = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
        if changes and not self.cfg.checkpoint.allow_config_change:
            raise ConfigError(
                f"checkpoint {path} was made with another config ({described}); resume with "
                "the same values, start afresh with a new log.run_dir or "
                "checkpoint.resume=none, or continue on the new config with "
                "checkpoint.allow_config_change=true")
        skip = set()
        if changes:
            log.warning("resuming %s with a changed config (checkpoint.allow_config_change): "
                        "%s; the schedule follows the new config", path, described)
            if any(key == "optim.name" for key, _, _ in changes):
                skip.add("optimizer")  # another optimizer's moments do not apply
        if self.ema is not None and "ema" not in saved:  # the EMA was switched on: it
            skip.add("ema")                                # starts from the resumed weights
        # allow_config_change also lets other teacher files pass (a warning, not a stop)
        self.state.load_state_dict(saved, skip=skip,
                                   strict=not self.cfg.checkpoint.allow_config_change)
        if "ema" in skip:
            self.ema.restart_from(self.model)
            log.info("the checkpoint holds no weight EMA; it starts from the resumed weights")
        log.info("resumed from %s at step %d", path, self.step)
        if self.env.is_main:
            drop_records_after(self.run_dir / "metrics.jsonl", self.step)
        return path

    def save_checkpoint(self) -> Path:
        """Every rank calls it; rank 0 copies the state to host memory and writes it in the
        background (training goes on meanwhile). A failure of the previous write stops every
        rank here."""
        self.checkpoints.agreed_wait()
        state = self.state.state_dict()
        final = self.checkpoints.directory / f"step-{self.step:08d}"
        if self.env.is_main:
            state["config"] = to_yaml(self.resolved_config())
            final = self.checkpoints.save(self.step, host_copy(state))
        return final

    def resolved_config(self) -> RunConfig:
        train = dataclasses.replace(self.cfg.train, per_device_batch=self.plan.per_device,
                                    accumulation=self.plan.accumulation)
        data = dataclasses.replace(self.cfg.data,  # the backend data.loader=auto chose
                                   loader=choose_loader(self.cfg.data, self.device))
        return dataclasses.replace(self.cfg, train=train, data=data)

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> StepResult:
        """One optimizer step over `accumulation` micro-batches."""
        accumulation = self.plan.accumulation
        result = StepResult()
        streams = self.streams  # the step is timed on the device where it has some
        if streams is not None:
            result.cuda_events["train_begin"] = _record_event(streams)
        self.guard.begin_step()  # the forwards below write BatchNorm statistics
        self.engine.begin_step(self.step)  # attack ranks: the weights of this step go out
        for micro in range(accumulation):
            while self.engine.wants_batch():  # ConAdv: fills the queue of future batches
                start = time.perf_counter()
                batch, key = self.stream.next()
                result.data_time += time.perf_counter() - start
                self.progress.bad_images += sum(batch["n_bad"].tolist())  # host-side
                self.engine.feed(batch, key, self.step)
            inputs = self.engine.take()
            result.attack_seconds += inputs.attack_seconds
            self.progress.count(inputs.images.shape[0], inputs.attack_image_steps,
                                inputs.teacher_images)
            with self._no_sync(micro == accumulation - 1):
                with self.engine.forward_context(inputs), self.autocast():
                    logits = self.train_forward(inputs.images)
                loss, stats = self.objective(logits, inputs)
                self.scaler.scale(loss / accumulation if accumulation > 1 else loss).backward()
            stats.update(self.objective.learn(logits, inputs, accumulation))
            result.add(loss.detach(), stats, inputs, accumulation)
        bad = self.guard.step_is_bad(result.loss, self.model.parameters())
        self.engine.before_optimizer_step()  # the attacks that read these weights are done
        self.guard.optimizer_step(self._optimizer_step, bad, self.optimizers)
        self.engine.after_optimizer_step()  # later attacks read the new weights
        if self.ema is not None:  # after the guard: a skipped step's weights are restored
            self.ema.after_optimizer_step(self.progress.step + 1)
        if streams is not None:
            result.cuda_events["train_end"] = _record_event(streams)
            launched = self.engine.attack_events()
            if launched is not None:
                result.cuda_events["attack_begin"], result.cuda_events["attack_end"] = launched
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1
        return result

    def _optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.objective.step()

    def newest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, as rank 0 sees it (a collective)."""
        self.checkpoints.agreed_wait()
        found = list_checkpoints(self.checkpoints.directory) if self.env.is_main else []
        return broadcast_object(found[0] if found else None)

    def run_eval(self, final: bool = False) -> dict[str, float]:
        """Exact over ranks, with rank 0's BatchNorm statistics on every rank (the ones its
        checkpoint holds, so `conadv-eval` of that checkpoint gives the same numbers)."""
        broadcast_buffers(self.model)
        attacks = self.final_attacks if final else None
        result = evaluate(self.model, self.eval_loader, self.device,
                          self.cfg.model.channels_last, self.autocast, attacks,
                          self.cfg.train.seed)
        if self.train_eval_loader is not None:
            seen = evaluate(self.model, self.train_eval_loader, self.device,
                            self.cfg.model.channels_last, self.autocast)
            result.update(train_top1=seen["top1"], train_loss=seen["loss"],
                          train_count=seen["count"], train_test_gap=seen["top1"] - result["top1"])
        if self.ema is not None:
            broadcast_buffers(self.ema.model)
            averaged = evaluate(self.ema.model, self.eval_loader, self.device,
                                self.cfg.model.channels_last, self.autocast, attacks,
                                self.cfg.train.seed)
            result.update({f"ema_{key}": value for key, value in averaged.items()
                           if key not in ("count", "unreadable")})
        return result

    def fit(self, stop_request: StopRequest) -> dict[str, Any]:
        """Train to the end (or a stop, which `stop_request` watches: the job's, made before
        the process group); returns the run summary."""
        cfg, env = self.cfg, self.env
        trackers = Trackers(self.run_dir, env.is_main, cfg.log.mlflow, cfg.log.wandb,
                            self.run_dir.name, flat_config(self.resolved_config()))
        telemetry = Telemetry(self.run_dir, env.is_main, cfg.log.tensorboard, cfg.log.progress,
                              self.total_steps, self.step, self.run_id, trackers)
        if env.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.resolved_config()))
            log.info("training %s on %s: %d steps, global batch %d = %d per device x %d ranks "
                     "x %d accumulation, %s", cfg.model.arch, cfg.data.name, self.total_steps,
                     self.plan.global_batch, self.plan.per_device, env.world_size,
                     self.plan.accumulation, self.device)
        cadence = Cadence(cfg, self.steps_per_epoch, self.total_steps, self.step, stop_request)
        window = MetricWindow(self.device)
        result: dict[str, float] = {}
        after = None
        skipped, unchecked_from = 0, self.step + 1  # steps since the last finiteness check
        train_start, start_step = time.perf_counter(), self.step
        finished_cleanly = False
        try:
            stop_request.begin()
            while self.step < self.total_steps:
                window.add(self.train_step())
                telemetry.advance()
                after = cadence.after(self.step)
                if after.check_finite:
                    skipped = self.guard.verdict(unchecked_from, self.step,
                                                 self.newest_checkpoint)
                    unchecked_from = self.step + 1
                if after.log:
                    telemetry.log("train", self.step, self.window_record(window, skipped))
                if after.evaluate:
                    result = self.run_eval(final=after.done)
                    telemetry.log("eval", self.step, {"epoch": round(self.epoch_progress, 4),
                                                      **result})
                if after.checkpoint:
                    self.save_checkpoint()
                    cadence.checkpointed(self.step)
                if after.stop_reason:
                    log.info("stopping after step %d with a checkpoint: %s; resume with "
                             "checkpoint.resume=auto", self.step, after.stop_reason)
                    break
            if not result and self.step == self.total_steps:
                # resumed a finished run: nothing was trained, still report its accuracy
                result = self.run_eval(final=True)
            self.checkpoints.agreed_wait()  # the last checkpoint is on disk before the report
            if after and after.stop_reason:
                stop_request.stopped()
            finished_cleanly = True
        finally:
            try:
                if finished_cleanly:
                    self.engine.drain()  # the side work still in flight (attack ranks' views)
            finally:
                stop_request.close(wait=finished_cleanly)
                telemetry.close()
                self.release_run_directory()
                if not finished_cleanly:
                    trackers.finish(False, [])
        stop_reason = after.stop_reason if after else None
        train_time = time.perf_counter() - train_start
        summary = {"run_id": self.run_id, "training": self.engine.label, "steps": self.step,
                   "epochs": round(self.epoch_progress, 4),
                   "global_batch": self.plan.global_batch, "world_size": env.world_size,
                   "train_time_s": round(train_time, 2),
                   "img_per_s": (self.step - start_step) * self.plan.global_batch
                   / max(train_time, 1e-9),
                   "bad_images": self.progress.total_bad_images(),
                   "compute": self.progress.compute.summary(),
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "finished": self.step == self.total_steps, "stop_reason": stop_reason,
                   "terminated": bool(after and after.terminated),
                   "planned_stop": bool(after and after.planned), "skipped_steps": skipped,
                   # seconds from the stop signal to here (its checkpoint on disk)
                   "stop_latency_s": (round(time.monotonic() - stop_request.requested_at, 3)
                                      if stop_reason and stop_request.requested_at else None),
                   "checkpoint_write_s": self.checkpoints.last_write_seconds,
                   "slurm_attempt": slurm_attempt(), "final_eval": result}
        summary.update(self.engine.summary())  # attack ranks: what they cost, per step
        telemetry.write_summary(summary)
        if trackers.active:  # the summary, the config and the report's figures as artifacts
            trackers.finish(summary["finished"], [self.run_dir / "summary.json",
                                                  self.run_dir / "config.yaml"],
                            lambda: build_report([self.run_dir], self.run_dir / "report").parent)
        return summary

    def window_record(self, window: MetricWindow, skipped: int) -> dict[str, Any]:
        """The `train` record of the steps since the last one (a collective), and a new
        window."""
        if self.streams is not None:  # the window's steps are done (the main stream's only)
            wait_for_current_stream(self.streams)
        elapsed = time.perf_counter() - window.started
        record = {"epoch": round(self.epoch_progress, 4), "lr": self.scheduler.get_last_lr()[0],
                  **window.record(self.env.world_size),
                  "img_per_s": window.steps * self.plan.global_batch / elapsed,
                  "step_time": elapsed / window.steps,
                  "bad_images": self.progress.bad_images, "skipped_steps": skipped}
        window.reset()
        return record
