"""`python -m tests.checked_train [overrides]`: conadv-train with CUDA's ordering rules checked
(tests/stream_order.py) in every rank, for multi-process layouts under a real torchrun (the
attack ranks, the stop agreement, DDP) that an in-process test cannot build.

Each rank installs the checker as its device's streams and runs the real entry point; the data
pipeline is host work, as on a GPU. A violation ends the rank with `StreamOrderError` and the
first cross-stream access that a GPU would not order, which the test reads from stderr."""

from __future__ import annotations

import sys

from tests.stream_order import checked_streams


def main(argv: list[str]) -> None:
    from conadv.cli.train import main as train_main

    with checked_streams(watch_host_reads=False) as checker, checker.host_data():
        try:
            train_main(argv)
        except SystemExit as finished:  # the CLI exits; the checker still has its say
            if finished.code not in (0, None):
                raise
    print("stream order checked: no violation", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
