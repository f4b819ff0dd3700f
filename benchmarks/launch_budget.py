"""The launch budget: device operations the training process dispatches per optimizer step,
per training mode, against a bare loop that does the same arithmetic by hand.

At the scale this project is for (a 96K batch on 1,024 GPUs is 96 images per GPU, steps of
about 16 ms), every operation the trainer dispatches is a kernel launch of a few microseconds of
host time, so launches, not arithmetic, bound the step. They can be counted exactly on the CPU:
a `TorchDispatchMode` counts every ATen operation `train()` dispatches, two run lengths are
subtracted (start-up and the final evaluation cancel) and divided by the steps between them.
Data loading is not counted: its operations (unpickling the workers' batches) run on host
tensors and launch nothing on a GPU.

The bare loops are written here from the model, optimizer and attack alone: the uint8 batch
made float, a forward, the loss, a backward and the optimizer step (the same optimizer as the
mode), and for ConAdv the attack and the two-view pass. The budgets (`BUDGETS`) are what the
trainer may add: 10 % over the bare loop, 10 operations for the skip policy, one for the EMA.

It also times the host: a step of the trainer and of the bare loop with a model small enough
that dispatch dominates (`host_overhead`), the difference per step in milliseconds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import benchmark_main, machine_info
from conadv.adversarial.attacks import AttackSpec, perturb
from conadv.config import RunConfig, load_config
from conadv.data.loader import BatchStream
from conadv.models import build_model
from conadv.models.multi_bn import MAIN, bn_views, convert_to_multi_bn
from conadv.optim import build_optimizer

DEMO = "configs/demo.yaml"
# what every counted run shares: the demo's model and batch, augmentation in a worker
# process, no logging, evaluation or checkpoint between the two lengths
COMMON = ["data.workers=1", "eval.robust=false", "log.every_steps=100000",
          "train.eval_every_epochs=100000", "train.eval_train_images=0",
          "checkpoint.every_steps=100000", "log.tensorboard=false", "log.progress=false"]

# the demo's model and batch, or a smaller one for the suite: how many operations a step
# dispatches does not depend on the widths, the image size or the batch
SIZES = {"demo": [], "small": ["model.cifar_width=4", "data.image_size=16",
                               "data.eval_resize=16", "train.global_batch=16"]}

# mode -> (overrides, what it is held against, the budget: a factor over it or operations
# added to it). The plain modes against a bare loop with the same optimizer; the EMA and the
# skip policy against the mode they are added to.
MODES: dict[str, tuple[list[str], str, tuple[str, float]]] = {
    "vanilla-sgd": (["adv.enabled=false"], "bare-sgd", ("times", 1.1)),
    "vanilla-lamb": (["adv.enabled=false", "optim.name=lamb"], "bare-lamb", ("times", 1.1)),
    "vanilla-lars": (["adv.enabled=false", "optim.name=lars"], "bare-lars", ("times", 1.1)),
    "vanilla-ema": (["adv.enabled=false", "train.ema_decay=0.999"], "vanilla-sgd",
                    ("plus", 1)),
    "vanilla-skip": (["adv.enabled=false", "train.on_nonfinite=skip"], "vanilla-sgd",
                     ("plus", 10)),
    "conadv-tau0": (["adv.enabled=true", "adv.tau=0"], "bare-conadv", ("times", 1.1)),
    "conadv-tau1": (["adv.enabled=true", "adv.tau=1"], "bare-conadv", ("times", 1.1)),
    "conadv-tau1-ema": (["adv.enabled=true", "adv.tau=1", "train.ema_decay=0.999"],
                        "conadv-tau1", ("plus", 1)),
    "conadv-tau1-skip": (["adv.enabled=true", "adv.tau=1", "train.on_nonfinite=skip"],
                         "conadv-tau1", ("plus", 10)),
}


def budget(mode: str, counts: dict[str, float]) -> float:
    """The most operations per step `mode` may dispatch."""
    _, against, (kind, amount) = MODES[mode]
    return counts[against] * amount if kind == "times" else counts[against] + amount


KERNELS = "<cuda kernels>"  # the profiler's count of CUDA kernels, beside the operations


@contextlib.contextmanager
def kernels_counted(ops: collections.Counter, device: torch.device) -> Iterator[None]:
    """On CUDA: add the CUDA kernels the profiler saw to `ops[KERNELS]`."""
    if device.type != "cuda":
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield
    torch.cuda.synchronize()
    ops[KERNELS] += sum(1 for event in prof.events()
                        if event.device_type == torch.autograd.DeviceType.CUDA)


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active, by name; `paused()` leaves
    some out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.counting, was = False, self.counting
        try:
            yield
        finally:
            self.counting = was


def per_step(run: Callable[[int], collections.Counter], short: int, long: int
             ) -> tuple[float, dict[str, float]]:
    """Operations per step (and by name) from two run lengths."""
    a, b = run(short), run(long)
    by_name = {name: (b[name] - a.get(name, 0)) / (long - short) for name in b
               if b[name] != a.get(name, 0)}
    return sum(v for name, v in by_name.items() if name != KERNELS), by_name


def _config(run_dir: str, overrides: list[str], steps: int) -> RunConfig:
    return load_config(DEMO, [*COMMON, *overrides, f"log.run_dir={run_dir}",
                              f"train.max_steps={steps}"])


def count_trainer(overrides: list[str], steps: int) -> collections.Counter:
    """The operations `train()` dispatches in a run of `steps` steps, data loading left out."""
    from conadv.train.job import train

    counter = OpCounter()
    real_next = BatchStream.next

    def next_uncounted(stream):
        with counter.paused():
            return real_next(stream)

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config(run_dir, overrides, steps)
        BatchStream.next = next_uncounted
        try:
            with counter, kernels_counted(counter.ops, torch.device(cfg.train.device)):
                train(cfg)
        finally:
            BatchStream.next = real_next
    return counter.ops


def bare_step(cfg: RunConfig, optimizer_name: str, conadv: bool) -> Callable[[], None]:
    """One step of the hand-written loop on a fixed uint8 batch of the demo's shape (its host
    copy made float on the device, as the trainer's)."""
    torch.manual_seed(0)
    device = torch.device(cfg.train.device)
    model = build_model(cfg.model, 10).to(device)
    if conadv:
        convert_to_multi_bn(model, ["adv"])
    optim = load_config(DEMO, [f"optim.name={optimizer_name}"]).optim
    optimizer = build_optimizer(model.named_parameters(), optim, optim.lr)
    batch = cfg.train.global_batch
    images = torch.randint(0, 256, (batch, 3, cfg.data.image_size, cfg.data.image_size),
                           dtype=torch.uint8)
    if device.type == "cuda":
        images = images.pin_memory()
    labels = torch.randint(0, 10, (batch,), device=device)
    adv = cfg.adv  # the published attack, as the engine makes it
    spec = AttackSpec(adv.epsilon, adv.step_size, adv.steps, adv.random_start_prob,
                      adv.targeted)
    smoothing = cfg.train.label_smoothing

    def step() -> None:
        x = images.to(device, non_blocking=True).float().div_(255)
        if conadv:
            with bn_views(model, [("adv", batch)], update_stats=False):
                made = perturb(model, x, labels, spec, 10,
                               torch.Generator(device).manual_seed(0))
            with bn_views(model, [(MAIN, batch), ("adv", batch)]):
                logits = model(torch.cat([x, made]))
            loss = (F.cross_entropy(logits[:batch], labels, label_smoothing=smoothing)
                    + F.cross_entropy(logits[batch:], labels, label_smoothing=smoothing)) / 2
        else:
            loss = F.cross_entropy(model(x), labels, label_smoothing=smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _with_references(modes: list[str]) -> list[str]:
    """`modes` and the modes they are held against, references first."""
    ordered: list[str] = []
    for mode in modes:
        against = MODES[mode][1]
        for name in (against, mode):
            if name in MODES and name not in ordered:
                ordered.append(name)
    return ordered


def count_bare(step: Callable[[], None], steps: int, device: torch.device
               ) -> collections.Counter:
    step()  # the optimizer's state exists from here on, as in a trainer's later steps
    counter = OpCounter()
    with counter, kernels_counted(counter.ops, device):
        for _ in range(steps):
            step()
    return counter.ops


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    # fp32 on both devices: the bare loops do not autocast
    size = [*SIZES[args.size], f"train.device={args.device}", "train.precision=fp32"]
    cfg = load_config(DEMO, size)
    short, long = args.steps
    device = torch.device(args.device)
    counts: dict[str, float] = {}
    top: dict[str, dict[str, float]] = {}
    bares = {"bare-sgd": ("sgd", False), "bare-lamb": ("lamb", False),
             "bare-lars": ("lars", False), "bare-conadv": ("sgd", True)}
    for name, (optimizer, conadv) in bares.items():
        step = bare_step(cfg, optimizer, conadv)
        counts[name], top[name] = per_step(lambda n, s=step: count_bare(s, n, device),
                                           short, long)
    modes = _with_references(args.modes)
    count_trainer([*size, *MODES[modes[0]][0]], short)  # imports that dispatch operations
    for mode in modes:
        overrides = [*size, *MODES[mode][0]]
        counts[mode], top[mode] = per_step(lambda n, o=overrides: count_trainer(o, n),
                                           short, long)
    rows = {}
    for mode in modes:
        against = MODES[mode][1]
        limit = budget(mode, counts)
        rows[mode] = {"ops_per_step": counts[mode], "against": against,
                      "against_ops_per_step": counts[against],
                      "ratio": counts[mode] / counts[against],
                      "budget": limit, "within_budget": counts[mode] <= limit,
                      "cuda_kernels_per_step": top[mode].get(KERNELS),
                      "most_frequent": dict(sorted(top[mode].items(),
                                                   key=lambda kv: -kv[1])[:8])}
    report = {"machine": machine_info(), "size": args.size, "steps": [short, long],
              "modes": rows,
              "bare": {name: counts[name] for name in bares}}
    if args.host_time:
        report["host_overhead"] = host_overhead(args.host_steps)
    return report


HOST_MODEL = ["model.cifar_width=2", "data.image_size=8", "data.eval_resize=8",
              "train.global_batch=8", "data.workers=0"]


def host_overhead(steps: int, rounds: int = 15) -> dict[str, float]:
    """Milliseconds per step of the trainer's `train_step` (vanilla, a batch served from
    memory) and of the bare loop, with a model so small that the host's dispatch is the step:
    rounds of each, alternated, and the fastest round of each (the least disturbed by other
    work on the machine)."""
    from conadv.distributed import detect_env
    from conadv.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config(run_dir, [*HOST_MODEL, "adv.enabled=false"], 10 * steps * rounds)
        trainer = Trainer(cfg, detect_env(), torch.device("cpu"))
        served = trainer.stream.next()
        trainer.stream.next = lambda: served
        bare = bare_step(cfg, "sgd", conadv=False)
        best = {"trainer": float("inf"), "bare": float("inf")}
        for _ in range(rounds):
            for name, step in (("trainer", trainer.train_step), ("bare", bare)):
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                best[name] = min(best[name], 1000 * (time.perf_counter() - start) / steps)
        trainer.release_run_directory()
    return {"trainer_ms": best["trainer"], "bare_ms": best["bare"],
            "overhead_ms": best["trainer"] - best["bare"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", nargs=2, type=int, default=[3, 7], metavar=("SHORT", "LONG"),
                        help="the two run lengths whose difference is counted")
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: also the CUDA kernels per step, from the profiler")
    parser.add_argument("--host-steps", type=int, default=50)
    parser.add_argument("--no-host-time", dest="host_time", action="store_false")
    parser.add_argument("--out", help="write the report as JSON here")
    return parser.parse_args(argv)


def print_report(report: dict[str, Any]) -> None:
    print(f"{'mode':18s} {'ops/step':>9s} {'against':>12s} {'ratio':>6s} {'budget':>7s}")
    for mode, row in report["modes"].items():
        flag = "" if row["within_budget"] else "  OVER BUDGET"
        kernels = row["cuda_kernels_per_step"]
        flag += f"  ({kernels:.1f} CUDA kernels)" if kernels is not None else ""
        print(f"{mode:18s} {row['ops_per_step']:9.1f} {row['against']:>12s} {row['ratio']:6.2f} "
              f"{row['budget']:7.1f}{flag}")
    host = report.get("host_overhead")
    if host:
        print(f"host time per step: trainer {host['trainer_ms']:.3f} ms, bare loop "
              f"{host['bare_ms']:.3f} ms, overhead {host['overhead_ms']:.3f} ms")


def main() -> None:
    benchmark_main(parse_args, run, print_report)


if __name__ == "__main__":
    main()
