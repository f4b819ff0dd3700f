"""torch.compile against eager on the same training step (ConAdv tau = 1 by default), in each
of the given `train.compile_mode`s (reduce-overhead captures CUDA graphs: CUDA only): the first
step's time (compilation included), the steady step time of each, and how many graphs dynamo
compiled over the run (a recompile per step would show here).

    python -m benchmarks.compile_speed                  # CPU benchmark model, 20 steps
    python -m benchmarks.compile_speed --device cuda --arch resnet50 --batch 256 \
        --image-size 224 --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from typing import Any

from benchmarks import step_throughput
from benchmarks.common import benchmark_main, machine_info, time_calls, write_json
from conadv.config import COMPILE_MODES


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    report: dict[str, Any] = {"machine": machine_info(), "mode": args.mode, "arch": args.arch,
                              "batch": args.batch, "steps": args.count, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ["eager", *args.compile_modes]:
            torch._dynamo.reset()
            counters.clear()
            args.extra = ([] if variant == "eager" else
                          ["train.compile=true", f"train.compile_mode={variant}"])
            trainer = step_throughput.build_trainer(args.mode, args, f"{tmp}/{variant}")
            times = time_calls(trainer.train_step, trainer.device, args.count, warmup=0)
            report["variants"][variant] = {
                "first_step_s": times[0], "steady_step_ms": 1000 * statistics.median(times[2:]),
                "graphs": int(counters["stats"]["unique_graphs"])}
            del trainer
            eager = report["variants"]["eager"]["steady_step_ms"]
            for entry in report["variants"].values():
                entry["over_eager"] = entry["steady_step_ms"] / eager
            write_json(args.out, report)  # a run cut short keeps the variants it finished
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"torch.compile ({report['arch']}, batch {report['batch']}, {report['mode']}, "
          f"{report['steps']} steps)")
    for variant, entry in report["variants"].items():
        print(f"  {variant:26s} first step {entry['first_step_s']:7.2f} s, steady "
              f"{entry['steady_step_ms']:8.1f} ms ({entry['over_eager']:.2f} x eager), "
              f"graphs compiled {entry['graphs']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = step_throughput.build_parser(__doc__)
    parser.add_argument("--mode", default="tau1", choices=sorted(step_throughput.MODES))
    parser.add_argument("--count", type=int, default=20, help="training steps per variant")
    parser.add_argument("--compile-modes", nargs="+", default=["default"],
                        choices=COMPILE_MODES, help="train.compile_mode values to time")
    return parser.parse_args(argv)


def main() -> None:
    benchmark_main(parse_args, run, print_report)


if __name__ == "__main__":
    main()
