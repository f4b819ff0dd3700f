"""conadv-eval --config FILE --checkpoint RUN_OR_CHECKPOINT_DIR [--robust] [--export OUT.pth]
[overrides]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conadv.cli.common import run_cli
from conadv.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="conadv-eval", description=__doc__)
    parser.add_argument("--config", help="YAML run configuration (the run's config.yaml works)")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint directory, or a run directory (newest checkpoint)")
    parser.add_argument("--export", type=Path,
                        help="also write the plain torchvision state_dict of the model here")
    parser.add_argument("--robust", action="store_true",
                        help="also report top-1 under FGSM and PGD (adv.eval_epsilon, "
                             "adv.eval_pgd_steps, adv.eval_step_size)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.workers=2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> int:
        from conadv.train.eval_job import run_evaluation

        result = run_evaluation(load_config(args.config, args.overrides), args.checkpoint,
                                args.export, args.robust)
        print(json.dumps(result))
        return 0

    run_cli("conadv-eval", body)


if __name__ == "__main__":
    main()
