"""The CPU benchmark suite behind `make bench` (well under 10 minutes on 2 cores): optimizer
step, training step (vanilla / tau 0 / tau 1, and vanilla / tau 1 distilling from 2
teachers), checkpoint stall, data pipeline, launch budget and the scaling model, written to
benchmarks/results/<machine>-<date>.json with the machine's description."""

from __future__ import annotations

import argparse
import datetime
import re
import time
from pathlib import Path

from benchmarks import (
    checkpoint_stall,
    data_pipeline,
    launch_budget,
    optimizer_step,
    scaling_model,
    step_throughput,
)
from benchmarks.common import machine_info, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine_slug(info: dict) -> str:
    name = info["cuda"]["device"] if info.get("cuda") else info["cpu"]
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{'gpu' if info.get('cuda') else 'cpu'}{info['cores']}-{words}"[:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="defaults to benchmarks/results/<machine>-<date>.json")
    args = parser.parse_args()
    info = machine_info()
    started = time.perf_counter()
    report = {"machine": info, "date": datetime.date.today().isoformat()}

    import torch

    report["optimizer_step"] = optimizer_step.run(torch.device("cpu"), rounds=5, steps_per_round=4)
    optimizer_step.print_table(report["optimizer_step"])
    steps_args = step_throughput.parse_args(["--device", "cpu", "--rounds", "4", "--steps", "4",
                                             "--teachers", "2"])
    report["step_throughput"] = step_throughput.run(steps_args)
    step_throughput.print_report(report["step_throughput"])
    stall_args = checkpoint_stall.parse_args(["--device", "cpu", "--rounds", "5"])
    report["checkpoint_stall"] = checkpoint_stall.run(stall_args)
    checkpoint_stall.print_report(report["checkpoint_stall"])
    report["data_pipeline"] = data_pipeline.run(images=256, workers=2, repeats=3)
    data_pipeline.print_report(report["data_pipeline"])
    report["launch_budget"] = launch_budget.run(launch_budget.parse_args(["--size", "small"]))
    launch_budget.print_report(report["launch_budget"])
    report["scaling_model"] = scaling_model.run(overlap=0.0)
    scaling_model.print_report(report["scaling_model"])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out = args.out or RESULTS / f"{machine_slug(info)}-{report['date']}.json"
    write_json(out, report)
    print(f"wrote {out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
