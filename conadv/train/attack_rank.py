"""The body of an attack rank's process (adv.attack_ranks): the model, the trainers' engine and
a data stream per trainer it serves, driven by the orders trainer 0 broadcasts. The protocol
itself (orders, weights, sends) is conadv.adversarial.attack_ranks."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from conadv.adversarial.attack_ranks import AttackOrders, view_header
from conadv.config import BatchPlan, RunConfig
from conadv.data.device import batch_to_device
from conadv.distributed import DistEnv, JobGroups, served_by
from conadv.train.parts import build_training_parts, train_stream
from conadv.train.runtime import configure_determinism


def run_attack_rank(cfg: RunConfig, env: DistEnv, device: torch.device, groups: JobGroups,
                    plan: BatchPlan) -> dict[str, Any]:
    """Serve the trainers until trainer 0 says stop. An attack is a pure function of (weights,
    batch, batch key), so this rank reads each served trainer's micro-batches through the
    trainers' sampler and attacks them with the broadcast weights: the views it sends are the
    ones the trainer would have made itself. `plan`: the trainers' batch plan."""
    trainers = plan.world_size
    configure_determinism(cfg.train.deterministic)
    served = served_by(env.rank, trainers, env.world_size - trainers)
    streams = {r: train_stream(cfg, plan, r, device) for r in served}
    num_classes = cfg.model.num_classes or next(iter(streams.values())).num_classes
    # the trainers' parts, for the BatchNorm routes and the attack (run inline here)
    inline = dataclasses.replace(cfg, adv=dataclasses.replace(cfg.adv, executor="sequential"))
    parts = build_training_parts(inline, plan, num_classes, device)
    model, engine = parts.model, parts.engine
    model.train()  # the attack normalises with batch statistics, as on the trainers
    orders = AttackOrders(cfg.adv, groups, list(model.parameters()), cfg.dist.timeout_s, device)
    positioned, served_steps = False, 0
    while (order := orders.next()) is not None:
        first, last = order
        if not positioned:  # the first order names the first step any trainer asks for
            for stream in streams.values():
                stream.seek(first)
            positioned = True
        for step in range(first, last + 1):
            for trainer, stream in streams.items():
                for _ in range(plan.accumulation):
                    batch, key = stream.next()
                    header = view_header(key, batch)  # read on the host, before the attack
                    moved = batch_to_device(batch, device, cfg.model.channels_last)
                    images = engine.make_adversarial(model, moved["image"], moved["label"], key)
                    orders.hold(step, images, header, trainer)
        orders.release()
        served_steps += 1
    return {"terminated": orders.terminated, "attack_rank": env.rank,
            "steps_served": served_steps}
