"""conadv-report RUN_DIR [RUN_DIR ...] --out DIR"""

from __future__ import annotations

import argparse
from pathlib import Path

from conadv.cli.common import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="conadv-report", description="Figures (PNG) and a report.md table from run "
        "directories; several runs are overlaid and labelled by what differs in their configs.")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (log.run_dir)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> int:
        from conadv.report import build_report

        print(f"report: {build_report(args.runs, args.out)}")
        return 0

    run_cli("conadv-report", body)


if __name__ == "__main__":
    main()
