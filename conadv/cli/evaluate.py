"""conadv-eval --checkpoint RUN_OR_CHECKPOINT_DIR [--config FILE] [--robust] [--ema]
[--autoattack [--autoattack-images N]] [--sharpness [--sharpness-images N]]
[--export OUT.pth] [--export-onnx OUT.onnx] [--force] [overrides]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conadv.cli.common import positive, positive_real, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="conadv-eval", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML run configuration; default: the "
                        "one the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint directory, or a run directory (newest checkpoint)")
    parser.add_argument("--export", type=Path,
                        help="also write the plain torchvision state_dict of the model here")
    parser.add_argument("--export-onnx", type=Path,
                        help="also write the inference model (main BatchNorm) as ONNX, "
                             "checked with onnxruntime against PyTorch")
    parser.add_argument("--force", action="store_true",
                        help="let --export and --export-onnx replace an existing file")
    parser.add_argument("--robust", action="store_true",
                        help="also report top-1 under FGSM and PGD (eval.epsilon, "
                             "eval.pgd_steps, eval.step_size)")
    parser.add_argument("--autoattack", action="store_true",
                        help="also AutoAttack's accuracy (standard, L-inf at eval.epsilon) on "
                             "a seeded subset of the validation images, beside clean, FGSM "
                             "and PGD accuracy on the same images")
    parser.add_argument("--autoattack-images", type=positive("images"), default=1000, metavar="N",
                        help="images AutoAttack evaluates (default 1000; it is slow)")
    parser.add_argument("--sharpness", action="store_true",
                        help="also the flatness of the training loss (Hessian top eigenvalue, "
                             "worst-case loss increase in a box of relative size rho) on a "
                             "seeded subset of training images, in eval mode")
    parser.add_argument("--sharpness-images", type=positive("images"), default=512, metavar="N")
    parser.add_argument("--sharpness-rho", type=positive_real, default=5e-4, metavar="RHO",
                        help="the box's relative size: |delta_i| <= rho (|w_i| + 1)")
    parser.add_argument("--ema", action="store_true",
                        help="evaluate (and export) the checkpoint's weight EMA "
                             "(train.ema_decay) instead of its weights")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.workers=2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> int:
        from conadv.train.eval_job import check_export, evaluation_config, run_evaluation

        check_export(args.export, args.force)
        check_export(args.export_onnx, args.force, "--export-onnx")
        cfg = evaluation_config(args.config, args.overrides, args.checkpoint)
        result = run_evaluation(cfg, args.checkpoint, args.export, args.robust, args.ema,
                                args.export_onnx,
                                args.autoattack_images if args.autoattack else 0,
                                args.sharpness_images if args.sharpness else 0,
                                args.sharpness_rho)
        print(json.dumps(result))
        return 0

    run_cli("conadv-eval", body)


if __name__ == "__main__":
    main()
