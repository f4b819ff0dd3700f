"""Optimizer step time on the ResNet-50 parameter set (25.6M parameters, 161 tensors).

Ours (LARS, LAMB) against timm's Lars and Lamb (best of their foreach and loop modes) and torch's
SGD-momentum (foreach) and AdamW (fused) as speed-of-light references, all in one invocation and
interleaved round by round, so machine noise hits every candidate alike. Prints a table, writes
JSON. Usage: python -m benchmarks.optimizer_step [--device cuda] [--out results.json]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm.optim
import torch
import torchvision

from benchmarks.common import machine_info, summarize, time_calls, write_json
from conadv.optim import LAMB, LARS
from conadv.optim.param_groups import split_decay_groups

WD = 5e-5


def candidates() -> dict[str, Callable[[list[dict]], torch.optim.Optimizer]]:
    return {
        "conadv LARS": lambda g: LARS(g, lr=1.0, momentum=0.9),
        "conadv LAMB": lambda g: LAMB(g, lr=1e-3),
        "conadv LAMB (no CPU kernel)": lambda g: LAMB(g, lr=1e-3, cpu_kernel=False),
        "timm Lars (foreach)": lambda g: timm.optim.Lars(g, lr=1.0, momentum=0.9, foreach=True),
        "timm Lars (loop)": lambda g: timm.optim.Lars(g, lr=1.0, momentum=0.9, foreach=False),
        "timm Lamb (foreach)": lambda g: timm.optim.Lamb(g, lr=1e-3, max_grad_norm=None,
                                                         foreach=True),
        "timm Lamb (loop)": lambda g: timm.optim.Lamb(g, lr=1e-3, max_grad_norm=None,
                                                      foreach=False),
        "torch SGD momentum (foreach)": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9,
                                                                  foreach=True),
        "torch AdamW (fused)": lambda g: torch.optim.AdamW(g, lr=1e-3, fused=True),
    }


def resnet50_params(device: torch.device) -> list[tuple[str, torch.nn.Parameter]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return list(model.named_parameters())


def run(device: torch.device, rounds: int, steps_per_round: int) -> dict:
    named = resnet50_params(device)
    optimizers = {}
    for name, factory in candidates().items():
        # each candidate gets its own copy of the weights and the same gradients
        copies = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
        for (_, c), (_, p) in zip(copies, named):
            c.grad = p.grad.clone()
        optimizers[name] = factory(split_decay_groups(copies, WD))
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            times[name] += time_calls(optimizer.step, device, steps_per_round, warmup=1)
    results = {name: summarize(t) for name, t in times.items()}

    # Ratios use each candidate's fastest step: on a shared machine the minimum is the
    # least disturbed measurement (timeit's advice); medians are reported beside it.
    def ms(name: str) -> float:
        return results[name]["min_ms"]

    def best(prefix: str) -> float:
        return min(ms(k) for k in results if k.startswith(prefix))

    if device.type == "cuda":  # the CPU kernel is CPU-only: both LAMB rows run the same code
        results.pop("conadv LAMB (no CPU kernel)")

    ratios = {
        "timm_lamb_best / conadv_lamb": best("timm Lamb") / ms("conadv LAMB"),
        "conadv_lamb / adamw_fused": ms("conadv LAMB") / ms("torch AdamW (fused)"),
        "conadv_lars / sgd_foreach": ms("conadv LARS") / ms("torch SGD momentum (foreach)"),
        "timm_lars_best / conadv_lars": best("timm Lars") / ms("conadv LARS"),
    }
    return {"benchmark": "optimizer_step", "device": str(device),
            "parameters": sum(p.numel() for _, p in named), "tensors": len(named),
            "results": results, "ratios": ratios, "machine": machine_info()}


def print_table(report: dict) -> None:
    print(f"optimizer step, ResNet-50 parameter set ({report['parameters']:,} parameters, "
          f"{report['tensors']} tensors) on {report['device']}")
    for name, r in report["results"].items():
        print(f"  {name:30s} min {r['min_ms']:7.1f} ms   median {r['median_ms']:7.1f} ms")
    for name, value in report["ratios"].items():
        print(f"  {name:30s} {value:8.2f}x  (from the minimum step times)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    report = run(torch.device(args.device), args.rounds, args.steps)
    print_table(report)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
