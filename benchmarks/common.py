"""Shared by the benchmarks: machine description, robust timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": None}
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(), "runtime": torch.version.cuda}
    return info


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, synchronising CUDA around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int,
               warmup: int = 2) -> list[float]:
    """Seconds per call, each call timed alone."""
    for _ in range(warmup):
        fn()
    return [timed_call(fn, device) for _ in range(repeats)]


def summarize(times: list[float]) -> dict[str, float]:
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
            "max_ms": 1000 * max(times), "n": len(times)}


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def benchmark_main(parse_args: Callable[[], Any], run: Callable[[Any], dict[str, Any]],
                   print_report: Callable[[dict[str, Any]], None]) -> None:
    """The command line of a benchmark: parse, run, print, and write the JSON to --out."""
    args = parse_args()
    report = run(args)
    print_report(report)
    write_json(args.out, report)
