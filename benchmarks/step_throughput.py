"""Training-step throughput: vanilla, sequential adversarial (tau = 0) and ConAdv (tau = 1) on
the same model, batch and device, in one invocation (rounds interleave the three, so machine
noise hits each alike).

Per mode: step time, clean images/s and a breakdown (data wait, attack, forward/backward,
optimizer; communication is 0 in this single-process benchmark). On CUDA also peak memory and
the measured overlap (T_attack + T_train - T_step) / min(T_attack, T_train) from CUDA events.
The adversarial/vanilla step-time ratio is printed next to its FLOP-count expectation.
With --teachers N, two more modes distil from N teachers of the benchmark's architecture
(random weights: the cost does not depend on them): vanilla and tau = 1, each with
distillation, and their cost over the same mode without.

    python -m benchmarks.step_throughput                       # CPU defaults (small ResNet)
    python -m benchmarks.step_throughput --teachers 2          # + distillation cost
    python -m benchmarks.step_throughput --device cuda --arch resnet50 --batch 256 \
        --image-size 224 --precision bf16 --channels-last --out results.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import machine_info, write_json
from conadv.config import load_config
from conadv.distributed import DistEnv
from conadv.train.step_metrics import cuda_overlap
from conadv.train.trainer import Trainer

MODES = {
    "vanilla": ["adv.enabled=false"],
    "tau0": ["adv.enabled=true", "adv.tau=0"],
    "tau1": ["adv.enabled=true", "adv.tau=1"],
}
DISTILL_MODES = {"vanilla+KD": "vanilla", "tau1+KD": "tau1"}  # mode -> the same without


class FixedBatchStream:
    """Synthetic input at no data cost: the same pinned uint8 batch every time (as the
    'synthetic data' numbers of NVIDIA's reference are measured), with fresh batch keys."""

    def __init__(self, batch: int, image_size: int, classes: int, pin: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                               generator=gen)
        labels = torch.randint(0, classes, (batch,), generator=gen)
        self.batch = {"image": images, "label": labels,
                      "n_bad": torch.zeros(batch, dtype=torch.long)}
        if pin:  # as the DataLoader delivers it: copies to the GPU do not block
            self.batch = {k: v.pin_memory() for k, v in self.batch.items()}
        self.key = 0
        self.num_classes = classes

    def next(self) -> tuple[dict[str, torch.Tensor], int]:
        self.key += 1
        return self.batch, self.key


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.arch={args.arch}", "model.cifar_width=32", "model.cifar_blocks=2"]


def write_teachers(args: argparse.Namespace, directory: str) -> str:
    """N teacher state-dict files of the benchmark's architecture; the distill override."""
    from conadv.models import build_model

    cfg = load_config(None, model_overrides(args))
    teachers = []
    for i in range(args.teachers):
        path = f"{directory}/teacher{i}.pt"
        torch.save(build_model(cfg.model, args.classes).backbone.state_dict(), path)
        teachers.append(f"{{weights: {path}, arch: {args.arch}, cifar_width: 32, "
                        "cifar_blocks: 2}")
    return f"distill.teachers=[{', '.join(teachers)}]"


def build_trainer(mode: str, args: argparse.Namespace, run_dir: str,
                  teachers: str = "") -> Trainer:
    distill = ["distill.enabled=true", teachers] if mode in DISTILL_MODES else []
    overrides = [
        f"data.name={args.data}", f"data.root={args.data_root}", f"data.workers={args.workers}",
        f"data.image_size={args.image_size}", f"data.eval_resize={args.image_size}",
        f"data.synthetic_classes={args.classes}", "data.synthetic_samples=512",
        *model_overrides(args), f"model.channels_last={str(args.channels_last).lower()}",
        f"train.global_batch={args.batch}", f"train.precision={args.precision}",
        f"train.device={args.device}", "train.epochs=1000", f"optim.name={args.optimizer}",
        "optim.lr=0.1", f"log.run_dir={run_dir}", "checkpoint.resume=none",
        *MODES[DISTILL_MODES.get(mode, mode)], *distill, *getattr(args, "extra", []),
    ]
    device = torch.device(args.device)
    trainer = Trainer(load_config(None, overrides), DistEnv("single", 0, 1, 0, "", 0), device)
    if args.data == "synthetic":
        trainer.stream = FixedBatchStream(args.batch, args.image_size, args.classes,
                                          device.type == "cuda")
    return trainer


def timed_steps(trainer: Trainer, steps: int) -> dict[str, Any]:
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = [trainer.train_step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    sample = {"step_s": elapsed / steps,
              "data_s": statistics.mean(r.data_time for r in results),
              "attack_host_s": statistics.mean(r.attack_seconds for r in results)}
    if cuda and results[-1].cuda_events:
        sample.update(cuda_overlap(results[-1].cuda_events))
    return sample


def optimizer_seconds(trainer: Trainer, repeats: int = 5) -> float:
    """The optimizer step alone, on gradients of the right shapes."""
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, 1e-4)
    cuda = trainer.device.type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    trainer.optimizer.zero_grad(set_to_none=True)
    return min(times)


def flop_expectation(attack_steps: int = 1) -> float:
    """Adversarial step / vanilla step by FLOPs. Vanilla: forward + backward = 3 forwards per
    image. Adversarial: an attack step costs a forward and an input-only backward (~2 forwards),
    and training sees two views (clean + adversarial): (2 k + 2 x 3) / 3."""
    return (2 * attack_steps + 6) / 3


def distill_expectation(mode: str, teachers: int) -> float:
    """Step time with / without distillation by FLOPs: each teacher runs a forward (1 unit)
    per clean image; vanilla training costs 3 units, ConAdv tau = 1 8 (see above)."""
    base = 3 if mode == "vanilla+KD" else 2 * 1 + 6
    return (base + teachers) / base


def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = [*MODES, *(DISTILL_MODES if args.teachers else [])]
    with tempfile.TemporaryDirectory() as tmp:
        teachers = write_teachers(args, tmp) if args.teachers else ""
        trainers = {mode: build_trainer(mode, args, f"{tmp}/{mode}", teachers)
                    for mode in modes}
        for trainer in trainers.values():
            for _ in range(args.warmup):
                trainer.train_step()
        samples: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, trainer in trainers.items():
                samples[mode].append(timed_steps(trainer, args.steps))
        report: dict[str, Any] = {}
        for mode, trainer in trainers.items():
            best = min(samples[mode], key=lambda s: s["step_s"])  # least disturbed round
            entry = {"step_ms": 1000 * best["step_s"],
                     "median_step_ms": 1000 * statistics.median(s["step_s"]
                                                                for s in samples[mode]),
                     "img_per_s": args.batch / best["step_s"],
                     "data_ms": 1000 * best["data_s"],
                     "optimizer_ms": 1000 * optimizer_seconds(trainer),
                     "communication_ms": 0.0}
            if trainer.device.type == "cuda":
                entry["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                for key in ("attack_ms", "train_ms", "overlap"):
                    if key in best:
                        entry[key] = best[key]
            else:
                entry["attack_ms"] = 1000 * best["attack_host_s"]
            entry["forward_backward_ms"] = (entry["step_ms"] - entry["data_ms"]
                                            - entry["optimizer_ms"]
                                            - (entry.get("attack_ms", 0.0)
                                               if trainer.device.type != "cuda" else 0.0))
            report[mode] = entry
            if trainer.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        del trainers
    ratios = {
        "tau1 / tau0 step time": report["tau1"]["step_ms"] / report["tau0"]["step_ms"],
        "tau0 / vanilla step time": report["tau0"]["step_ms"] / report["vanilla"]["step_ms"],
        "tau0 / vanilla FLOP expectation": flop_expectation(),
        "tau1 / vanilla step time": report["tau1"]["step_ms"] / report["vanilla"]["step_ms"],
    }
    for mode, without in DISTILL_MODES.items():
        if mode in report:
            ratios[f"{mode} / {without} step time"] = (report[mode]["step_ms"]
                                                       / report[without]["step_ms"])
            ratios[f"{mode} / {without} FLOP expectation"] = distill_expectation(
                mode, args.teachers)
    return {"benchmark": "step_throughput", "config": vars(args), "modes": report,
            "ratios": ratios, "machine": machine_info()}


def print_report(report: dict[str, Any]) -> None:
    c = report["config"]
    print(f"training step, {c['arch']} at {c['image_size']} px, batch {c['batch']}, "
          f"{c['precision']}, {c['device']}, data {c['data']}")
    columns = ["step_ms", "img_per_s", "data_ms", "attack_ms", "forward_backward_ms",
               "optimizer_ms", "overlap", "peak_memory_gb"]
    print("  " + "mode".ljust(11) + "".join(col.rjust(20) for col in columns))
    for mode, entry in report["modes"].items():
        cells = [f"{entry[col]:.2f}" if col in entry else "-" for col in columns]
        print("  " + mode.ljust(11) + "".join(cell.rjust(20) for cell in cells))
    for name, value in report["ratios"].items():
        print(f"  {name:40s} {value:6.3f}")


def build_parser(description: str | None = __doc__) -> argparse.ArgumentParser:
    """The options of a training-step benchmark (shared with benchmarks.checkpoint_stall)."""
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--arch", default="resnet50" if cuda else "cifar_resnet")
    parser.add_argument("--batch", type=int, default=256 if cuda else 64)
    parser.add_argument("--image-size", type=int, default=224 if cuda else 32)
    parser.add_argument("--classes", type=int, default=1000 if cuda else 10)
    parser.add_argument("--precision", default="bf16" if cuda else "fp32",
                        choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true", default=cuda)
    parser.add_argument("--optimizer", default="lars", choices=["sgd", "lars", "lamb"])
    parser.add_argument("--data", default="synthetic",
                        choices=["synthetic", "digits", "imagefolder"])
    parser.add_argument("--data-root", default="")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--teachers", type=int, default=0,
                        help="also time distillation from this many teachers")
    parser.add_argument("--out", help="write the JSON report here")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
