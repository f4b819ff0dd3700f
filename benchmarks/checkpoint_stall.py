"""How much a checkpoint stalls training: the step that writes a checkpoint (train step + host
copy of the state + hand-over to the background writer) and the step after it (which runs
beside the writer) against a normal step, on the same trainer, interleaved in one invocation.
For reference, the time of a synchronous write (serialise, checksum, fsync, rename) is shown.

    python -m benchmarks.checkpoint_stall                 # CPU benchmark model, ConAdv tau = 1
    python -m benchmarks.checkpoint_stall --device cuda --arch resnet50 --batch 256 \
        --image-size 224 --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

from benchmarks import step_throughput
from benchmarks.common import benchmark_main, machine_info, timed_call
from conadv.checkpoints.format import list_checkpoints


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = step_throughput.build_trainer(args.mode, args, run_dir)
        device = trainer.device
        for _ in range(3):  # warm-up (allocator, kernels, the first attacks)
            trainer.train_step()
        normal, writing, after, synchronous = [], [], [], []
        for _ in range(args.rounds):
            normal.append(timed_call(trainer.train_step, device))

            def step_and_save() -> None:
                trainer.train_step()
                trainer.save_checkpoint()

            writing.append(timed_call(step_and_save, device))
            after.append(timed_call(trainer.train_step, device))
            trainer.checkpoints.wait()
            synchronous.append(timed_call(lambda: (trainer.save_checkpoint(),
                                                   trainer.checkpoints.wait()), device))
        newest = list_checkpoints(trainer.checkpoints.directory)[0]
        size = sum(f.stat().st_size for f in newest.iterdir())
    median = statistics.median
    return {"machine": machine_info(), "mode": args.mode, "arch": args.arch,
            "batch": args.batch, "image_size": args.image_size, "rounds": args.rounds,
            "checkpoint_mb": round(size / 2**20, 2),
            "normal_step_ms": 1000 * median(normal),
            "checkpoint_step_ms": 1000 * median(writing),
            "step_after_checkpoint_ms": 1000 * median(after),
            "synchronous_write_ms": 1000 * median(synchronous),
            "checkpoint_step_ratio": median(writing) / median(normal),
            "step_after_ratio": median(after) / median(normal)}


def print_report(report: dict[str, Any]) -> None:
    print(f"checkpoint stall ({report['arch']}, batch {report['batch']}, {report['mode']}, "
          f"checkpoint {report['checkpoint_mb']} MB)")
    print(f"  normal step            {report['normal_step_ms']:8.1f} ms")
    print(f"  step that checkpoints  {report['checkpoint_step_ms']:8.1f} ms "
          f"({report['checkpoint_step_ratio']:.2f}x)")
    print(f"  step after it          {report['step_after_checkpoint_ms']:8.1f} ms "
          f"({report['step_after_ratio']:.2f}x, beside the background write)")
    print(f"  a synchronous write    {report['synchronous_write_ms']:8.1f} ms (for reference)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = step_throughput.build_parser(__doc__)
    parser.add_argument("--mode", default="tau1", choices=sorted(step_throughput.MODES))
    return parser.parse_args(argv)


def main() -> None:
    benchmark_main(parse_args, run, print_report)


if __name__ == "__main__":
    main()
