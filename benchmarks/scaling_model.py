"""An analytic model of one data-parallel training step, to predict 96K-batch ResNet-50 on 64 to
2,048 GPUs, checked against a published large-scale point.

Step time of one GPU at micro-batch b, accumulation a (all times in ms):

    compute(b)   = t_fixed + b * t_image
                   t_fixed: per-step kernel latency floor (~500 kernels of a ResNet-50
                   forward+backward at >= ~6 us each when the batch is too small to fill the
                   GPU); t_image: per-image time, calibrated so that the model reproduces the
                   large-batch anchor (8x H100, 256 images per GPU, 7,150 img/s per GPU).
    all-reduce   = hierarchical: reduce-scatter + all-gather inside a node over NVLink
                   (2 (g-1)/g S / B_nvlink), then across nodes on each GPU's own NIC for its
                   1/g shard (2 (n-1)/n S/g / B_net) plus a tree latency 2 log2(n) alpha;
                   S = gradient bytes (bf16), g = GPUs per node, n = nodes.
    exposed comm = what the backward of the last micro-step (2/3 of its compute) cannot hide
                   when the gradient buckets are all-reduced as they become ready, and never
                   less than one bucket's share.
    optimizer    = LARS over the parameters, memory-bound (~15 passes over fp32 state).
    vanilla step = a compute(b) + exposed + optimizer
    efficiency   = img/s on N GPUs / (N x img/s of one GPU at the anchor's 256 per GPU): it
                   counts both communication and small per-GPU batches.
    ConAdv step  = per micro-step: train on 2b images (clean + adversarial view) and an attack
                   (a forward and an input-only backward: 2/3 of compute per image) that runs
                   on a second stream; overlap o of the shorter one is hidden:
                   train + attack - o min(train, attack); o = 0 is tau = 0 (sequential).

    attack ranks = T trainers train on 2b images per micro-step (no attack on their devices);
                   A attack ranks each attack the batches of T/A trainers (their per-GPU batch
                   at the attack's 2/3 of compute per image) after receiving the weights
                   (trainer 0 broadcasts P params in fp32 or bf16: a pipelined tree broadcast,
                   S / B_net + log2(A) alpha) and send the adversarial images back (fp32, 3 x
                   224 x 224 x 4 bytes each, to each trainer over its own NIC, alongside the
                   gradient all-reduce). With tau >= 1 both are a step ahead, so the step is
                   max(trainer step + what the incoming images add to its NIC time, attack
                   rank time); the trainers never wait once A >= T x attack / trainer step.

Check: MLPerf v4.0, 2,528 H100 at global batch 40,448 (16 per GPU): ~2,770 img/s per GPU.
    python -m benchmarks.scaling_model [--overlap 0.3] [--out results.json]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import write_json

RESNET50_PARAMS = 25_557_032


@dataclass(frozen=True)
class Cluster:
    name: str = "H100 SXM, 8 per node, NVLink 4, 400 Gb/s InfiniBand per GPU"
    anchor_img_s: float = 7150.0  # per GPU at 256/GPU, 8 GPUs (MLPerf Training v4.0 results)
    anchor_batch: int = 256
    t_fixed_ms: float = 3.0  # ~500 kernels x ~6 us latency floor (estimate, see docstring)
    gpus_per_node: int = 8
    nvlink_gb_s: float = 450.0  # per GPU, one direction
    net_gb_s: float = 50.0  # 400 Gb/s per GPU
    bus_efficiency: float = 0.8  # achieved / link bandwidth for NCCL collectives
    latency_us: float = 5.0  # per hop
    hbm_tb_s: float = 3.35
    max_micro_batch: int = 256

    @property
    def t_image_ms(self) -> float:
        return (1000 * self.anchor_batch / self.anchor_img_s - self.t_fixed_ms) / (
            self.anchor_batch)


def compute_ms(c: Cluster, batch: float) -> float:
    return c.t_fixed_ms + batch * c.t_image_ms


def allreduce_ms(c: Cluster, gpus: int, grad_bytes: float) -> float:
    g = min(gpus, c.gpus_per_node)
    nodes = max(1, gpus // c.gpus_per_node)
    intra = 2 * (g - 1) / g * grad_bytes / (c.nvlink_gb_s * c.bus_efficiency * 1e9)
    shard = grad_bytes / g
    inter = 0.0
    if nodes > 1:
        inter = (2 * (nodes - 1) / nodes * shard / (c.net_gb_s * c.bus_efficiency * 1e9)
                 + 2 * math.log2(nodes) * c.latency_us * 1e-6)
    return 1000 * (intra + inter)


def optimizer_ms(c: Cluster, params: int = RESNET50_PARAMS, passes: int = 15) -> float:
    return 1000 * passes * 4 * params / (c.hbm_tb_s * 1e12)


def step(c: Cluster, global_batch: int, gpus: int, mode: str, overlap: float = 0.0,
         buckets: int = 4) -> dict[str, float]:
    """Predicted step of `mode` (vanilla, tau0, tau1) at this scale."""
    per_gpu = global_batch / gpus
    accumulation = max(1, math.ceil(per_gpu / c.max_micro_batch))
    micro = per_gpu / accumulation
    if mode == "vanilla":
        micro_ms = compute_ms(c, micro)
        backward_ms = 2 / 3 * micro * c.t_image_ms
    else:
        train = compute_ms(c, 2 * micro)
        attack = c.t_fixed_ms * 2 / 3 + 2 / 3 * micro * c.t_image_ms
        hidden = (overlap if mode == "tau1" else 0.0) * min(train, attack)
        micro_ms = train + attack - hidden
        backward_ms = 2 / 3 * 2 * micro * c.t_image_ms
    comm = allreduce_ms(c, gpus, 2 * RESNET50_PARAMS)
    exposed = max(comm - backward_ms, comm / buckets) if gpus > 1 else 0.0
    total = accumulation * micro_ms + exposed + optimizer_ms(c)
    images_s = global_batch / (total / 1000)
    # the same mode on one GPU at the anchor's per-GPU batch: the ideal per-GPU rate
    ideal = step(c, c.anchor_batch, 1, mode, overlap, buckets)["img_s"] if gpus > 1 else images_s
    return {"gpus": gpus, "per_gpu_batch": per_gpu, "micro_batch": micro,
            "accumulation": accumulation, "step_ms": total, "allreduce_ms": comm,
            "exposed_comm_ms": exposed, "img_s": images_s, "img_s_per_gpu": images_s / gpus,
            "scaling_efficiency": images_s / (gpus * ideal)}


IMAGE_BYTES = 3 * 224 * 224 * 4  # one adversarial image, fp32


def attack_rank_layout(c: Cluster, global_batch: int, trainers: int, attackers: int,
                       weight_bytes: int = 4) -> dict[str, float]:
    """ConAdv with `attackers` attack ranks beside `trainers` trainer GPUs (see the module
    docstring): bytes per step both ways and the predicted step."""
    per_gpu = global_batch / trainers
    accumulation = max(1, math.ceil(per_gpu / c.max_micro_batch))
    micro = per_gpu / accumulation
    train_ms = accumulation * compute_ms(c, 2 * micro)
    comm = allreduce_ms(c, trainers, 2 * RESNET50_PARAMS)
    exposed = max(comm - 2 / 3 * 2 * micro * c.t_image_ms, comm / 4) if trainers > 1 else 0.0
    images_in = per_gpu * IMAGE_BYTES  # per trainer per step
    # the incoming images share the trainer's NIC with the all-reduce: what the all-reduce
    # leaves of the step is free, the rest is added
    nic_ms = 1000 * images_in / (c.net_gb_s * c.bus_efficiency * 1e9)
    trainer_ms = train_ms + exposed + optimizer_ms(c) + max(0.0, nic_ms - (train_ms - comm))
    weights_out = RESNET50_PARAMS * weight_bytes
    broadcast_ms = 1000 * (weights_out / (c.net_gb_s * c.bus_efficiency * 1e9)
                           + math.log2(max(attackers, 2)) * c.latency_us * 1e-6)
    served = math.ceil(trainers / attackers)
    attack_one_ms = accumulation * (c.t_fixed_ms * 2 / 3 + 2 / 3 * micro * c.t_image_ms)
    send_ms = 1000 * served * images_in / (c.net_gb_s * c.bus_efficiency * 1e9)
    attacker_ms = broadcast_ms + max(served * attack_one_ms, send_ms)
    return {"trainers": trainers, "attack_ranks": attackers, "weight_bytes": weight_bytes,
            "weights_out_mb_per_step": weights_out / 1e6,
            "images_in_mb_per_trainer_step": images_in / 1e6,
            "images_in_gb_per_step_total": trainers * images_in / 1e9,
            "trainer_ms": trainer_ms, "attacker_ms": attacker_ms,
            "attack_ms_per_trainer": attack_one_ms,
            "step_ms": max(trainer_ms, attacker_ms),
            "img_s": global_batch / (max(trainer_ms, attacker_ms) / 1000)}


def attack_ranks_needed(c: Cluster, global_batch: int, trainers: int,
                        weight_bytes: int = 4) -> dict[str, float]:
    """The fewest attack ranks with which the trainers never wait, and that layout."""
    for attackers in range(1, trainers + 1):
        layout = attack_rank_layout(c, global_batch, trainers, attackers, weight_bytes)
        if layout["attacker_ms"] <= layout["trainer_ms"]:
            return layout
    return layout


def mlperf_check(c: Cluster) -> dict[str, float]:
    predicted = step(c, 40_448, 2_528, "vanilla")["img_s_per_gpu"]
    published = 2_770.0
    return {"predicted_img_s_per_gpu": predicted, "published_img_s_per_gpu": published,
            "relative_error": predicted / published - 1}


def run(overlap: float) -> dict[str, Any]:
    c = Cluster()
    table = {mode: [step(c, 98_304, n, mode, overlap) for n in (64, 128, 256, 512, 1024, 2048)]
             for mode in ("vanilla", "tau0", "tau1")}
    needed = {name: attack_ranks_needed(c, 98_304, 1024, size)
              for name, size in (("fp32", 4), ("bf16", 2))}
    return {"benchmark": "scaling_model", "cluster": asdict(c), "overlap": overlap,
            "t_image_ms": c.t_image_ms, "mlperf_check": mlperf_check(c),
            "predictions_96k": table, "attack_ranks_96k_1024": {
                "vanilla_step_ms": step(c, 98_304, 1024, "vanilla")["step_ms"],
                "side_stream_step_ms": step(c, 98_304, 1024, "tau1", overlap)["step_ms"],
                "sequential_step_ms": step(c, 98_304, 1024, "tau0")["step_ms"],
                "needed": needed}}


def print_report(report: dict[str, Any]) -> None:
    check = report["mlperf_check"]
    print(f"check: 2,528 H100 at 40,448: predicted {check['predicted_img_s_per_gpu']:,.0f} "
          f"img/s per GPU, published {check['published_img_s_per_gpu']:,.0f} "
          f"({100 * check['relative_error']:+.1f}%)")
    print(f"ResNet-50 at global batch 98,304 ({report['cluster']['name']}; ConAdv overlap "
          f"{report['overlap']})")
    print("  mode     GPUs  per GPU  micro x acc   step ms    img/s total  per GPU  efficiency")
    for mode, rows in report["predictions_96k"].items():
        for r in rows:
            print(f"  {mode:7s} {r['gpus']:5d} {r['per_gpu_batch']:8.0f}  {r['micro_batch']:5.0f}"
                  f" x {r['accumulation']:<3d} {r['step_ms']:9.1f} {r['img_s']:14,.0f} "
                  f"{r['img_s_per_gpu']:8,.0f} {100 * r['scaling_efficiency']:10.1f}%")
    ranks = report["attack_ranks_96k_1024"]
    print(f"attack ranks beside 1,024 trainer GPUs at 98,304: vanilla "
          f"{ranks['vanilla_step_ms']:.1f} ms, ConAdv on a side stream "
          f"{ranks['side_stream_step_ms']:.1f} ms, sequential {ranks['sequential_step_ms']:.1f} ms")
    for name, r in ranks["needed"].items():
        print(f"  weights in {name}: {r['attack_ranks']} attack ranks (each serving "
              f"{-(-r['trainers'] // r['attack_ranks'])} trainers) keep the trainers from "
              f"waiting: step {r['step_ms']:.1f} ms (trainer {r['trainer_ms']:.1f}, attack rank "
              f"{r['attacker_ms']:.1f}); {r['weights_out_mb_per_step']:.0f} MB of weights out, "
              f"{r['images_in_mb_per_trainer_step']:.1f} MB of images into each trainer "
              f"({r['images_in_gb_per_step_total']:.1f} GB in all) per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="fraction of the shorter of attack/train hidden by the attack "
                             "stream (measure it with step_throughput on the GPU)")
    parser.add_argument("--out")
    args = parser.parse_args()
    report = run(args.overlap)
    print_report(report)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
