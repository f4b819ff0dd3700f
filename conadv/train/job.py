"""A training job's process: which role it plays (a trainer alone, a trainer beside attack
ranks, an attack rank), the stop request that spans its start-up, and the process group. The
training itself is conadv/train/trainer.py; an attack rank's body conadv/train/attack_rank.py."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch

from conadv.adversarial.attack_ranks import AttackLink
from conadv.config import RunConfig, plan_job, to_yaml
from conadv.distributed import (
    DistEnv,
    JobGroups,
    detect_env,
    pick_device,
    process_group,
)
from conadv.telemetry import setup_logging, write_summary
from conadv.train.attack_rank import run_attack_rank
from conadv.train.parts import check_factories
from conadv.train.preemption import StopRequest, slurm_attempt
from conadv.train.run_directory import held_here
from conadv.train.trainer import Trainer

log = logging.getLogger(__name__)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run a whole training job in this process (one rank of it under torchrun or Slurm).
    Returns the run summary on rank 0; elsewhere only whether a signal ended it."""
    check_factories(cfg)  # before any rank joins the job
    env = detect_env()
    setup_logging(env.is_main)
    device = pick_device(cfg.train.device, env, cfg.dist.backend)
    job = plan_job(cfg, env.world_size)  # the last adv.attack_ranks ranks attack
    # A stop signal is a request from here on (acted on after the first step), not the end of
    # the process: joining the process group and resuming take minutes on a thousand ranks.
    # A start-up that does not reach the first step in time ends on its own (preemption.py).
    # (An attack rank only survives it: trainer 0 tells it when the trainers stop.)
    stop_request = StopRequest(Path(cfg.log.run_dir), env.is_main, device,
                               job.trainers > 1 and env.rank < job.trainers,
                               partial(_record_startup_stop, cfg, env.is_main))
    try:
        with process_group(env, device, cfg.dist.backend, cfg.dist.timeout_s,
                           job.trainers) as groups:
            if env.rank >= job.trainers:
                stop_request.begin()  # it ends when trainer 0 says so, whenever that is
                return run_attack_rank(cfg, env, device, groups, job.batch)
            if groups is None:
                summary = Trainer(cfg, env, device).fit(stop_request)
            else:
                summary = _train_beside_attack_ranks(cfg, env, device, groups, job.trainers,
                                                     stop_request)
    finally:
        stop_request.close(wait=False)  # if fit() did not get to
    return summary if env.is_main else {"terminated": summary["terminated"]}


def _record_startup_stop(cfg: RunConfig, is_main: bool, reason: str) -> None:
    """The summary of a run ended before its first step, written by rank 0 where it holds the
    run directory (launch/slurm.sbatch requeues on it), never into another run's; with the
    config, if start-up had not written it yet, so that the requeued attempt recognises this
    run (free keys such as the derived batch split may differ; resume ignores those)."""
    run_dir = Path(cfg.log.run_dir)
    if not (is_main and held_here(run_dir)):
        return
    if not (run_dir / "config.yaml").exists():
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    write_summary(run_dir, {"steps": None, "finished": False, "stop_reason": reason,
                            "terminated": True, "planned_stop": False,
                            "slurm_attempt": slurm_attempt(), "final_eval": None})


def _train_beside_attack_ranks(cfg: RunConfig, env: DistEnv, device: torch.device,
                               groups: JobGroups, trainers: int,
                               stop_request: StopRequest) -> dict[str, Any]:
    """A trainer of a job with attack ranks: whatever ends the run (the last step, a stop
    signal, an error before or during the loop), trainer 0 tells the attack ranks."""
    link = AttackLink(cfg.adv, groups, env, trainers, cfg.dist.timeout_s, device)
    if env.is_main:
        log.info("ranks 0-%d train; ranks %d-%d attack (weights sent in %s)", trainers - 1,
                 trainers, env.world_size - 1, link.weights)
    failed = True
    try:
        summary = Trainer(cfg, env, device, link).fit(stop_request)
        failed = False
    finally:
        link.stop(failed, terminated=not failed and summary["terminated"])
    return summary
