"""conadv-train --config FILE [section.key=value ...]"""

from __future__ import annotations

import argparse
import os

from conadv.cli.common import run_cli
from conadv.config import describe_knobs, load_config, plan_job
from conadv.distributed import detect_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="conadv-train", description=__doc__)
    parser.add_argument("--config", help="YAML run configuration")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its default and doc, then exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print the batch split for this world size "
                             "(WORLD_SIZE or the Slurm/torchrun environment) and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.2")
    return parser.parse_args(argv)


def describe_result(summary: dict) -> str:
    """The run's one-line result: clean accuracy, accuracy under attack when measured."""
    final = summary["final_eval"]
    parts = [f"final test top-1: {final['top1']:.2f}% top-5: {final['top5']:.2f}%"]
    parts += [f"{name[:-5].replace('_', ' ').upper()} top-1: {value:.2f}%"
              for name, value in final.items()
              if name.endswith("_top1") and name not in ("top1", "train_top1")]
    if "train_top1" in final:
        parts.append(f"train top-1: {final['train_top1']:.2f}% "
                     f"(gap {final['train_test_gap']:+.2f})")
    kind = summary.get("training", "")
    return (" | ".join(parts) + f" ({final['count']} images, {summary['steps']} steps, "
            f"{summary['train_time_s']:.1f} s{', ' + kind if kind else ''})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> int:
        # the factories own the names of data sources, architectures and optimizers
        from conadv.train.parts import check_factories, registered_names

        if args.help_config:
            print(describe_knobs(registered_names()))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:  # (training checks in train(), before any rank joins)
            check_factories(cfg)
            env = detect_env()
            world = env.world_size if env.is_distributed else int(os.environ.get("WORLD_SIZE", 1))
            job = plan_job(cfg, world)
            plan, trainers = job.batch, job.trainers
            print(f"global batch {plan.global_batch} = {plan.per_device} per device x "
                  f"{plan.world_size} ranks x {plan.accumulation} accumulation steps")
            if job.attackers:
                print(f"ranks 0-{trainers - 1} train; ranks {trainers}-{world - 1} attack "
                      f"(each serves {-(-trainers // (world - trainers))} trainers or fewer, "
                      f"weights sent in {cfg.adv.attack_weights})")
            return 0
        # heavy imports only when training
        from conadv.train.job import train
        from conadv.train.preemption import TERMINATED_EXIT_STATUS

        summary = train(cfg)
        final = summary.get("final_eval")
        if final:
            print(describe_result(summary))
        return TERMINATED_EXIT_STATUS if summary.get("terminated") else 0

    run_cli("conadv-train", body)


if __name__ == "__main__":
    main()
