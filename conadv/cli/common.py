"""What every entry point shares: turning user errors into one line and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from conadv.errors import UserError


def one_sentence(err: BaseException) -> str:
    """A user error's message; errors re-raised from DataLoader workers carry the worker's
    traceback, whose last line is the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(program: str, body: Callable[[], int | None]) -> None:
    try:
        code = body()
    except UserError as err:
        print(f"{program}: error: {one_sentence(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
