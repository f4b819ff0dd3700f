"""What every entry point shares: turning user errors into one line and a non-zero exit, and
leaving each failing rank's error where torchrun reports it."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from conadv.errors import UserError


def positive(unit: str) -> Callable[[str], int]:
    """An argparse type: a whole number of `unit` above 0, or argparse's one-line error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number of {unit}, got "
                                             f"{text!r}")
        return value

    return parse


def positive_real(text: str) -> float:
    """An argparse type: a finite number above 0 (NaN passes every comparison that would
    refuse it, so it is named here)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def one_sentence(err: BaseException) -> str:
    """A user error's message; errors re-raised from DataLoader workers carry the worker's
    traceback, whose last line is the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


def record_for_torchrun(err: BaseException) -> None:
    """Under torchrun, write the error file its agent reads (what torch.distributed.elastic's
    `@record` does), so the launcher's failure report names this rank and its error instead of
    `error_file: <N/A>`. Elsewhere, nothing."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(err)


# Set by conadv-launch: each worker writes its exit status there, so the launcher can tell a
# clean stop (75 on every worker) from a failure, which torchrun reports alike.
STATUS_DIR_VARIABLE = "CONADV_LAUNCH_STATUS_DIR"


def report_exit_status(code: int) -> None:
    directory = os.environ.get(STATUS_DIR_VARIABLE)
    if directory and os.path.isdir(directory):
        with open(os.path.join(directory, f"local-rank-{os.environ.get('LOCAL_RANK', '0')}"),
                  "w") as handle:
            handle.write(str(code))


def run_cli(program: str, body: Callable[[], int | None]) -> None:
    try:
        code = body()
    except UserError as err:
        print(f"{program}: error: {one_sentence(err)}", file=sys.stderr)
        record_for_torchrun(err)
        report_exit_status(2)
        sys.exit(2)
    except Exception as err:
        record_for_torchrun(err)
        raise
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(130)
    report_exit_status(code or 0)
    sys.exit(code or 0)
