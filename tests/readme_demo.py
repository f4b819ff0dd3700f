"""The README quotes what `make demo` prints; this keeps the quote true.

The demo is deterministic (train.deterministic, the same thread count), so its result lines are
exact. `.ci/run` runs `make demo` on the clean clone and then

    python -m tests.readme_demo --check demo.log

which fails, naming the line, when a result line the demo printed differs from the README's
quoted block, training times aside (they are measured, not computed). After a change that moves
the numbers on purpose, `--write demo.log` puts the new lines into the README.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- demo-results: the lines `make demo` prints; .ci/run checks them -->"
END = "<!-- /demo-results -->"
RESULT = re.compile(r"^final test top-1: .*$", re.MULTILINE)
SECONDS = re.compile(r"\d+(\.\d+)? s, ")


def printed_results(log: str) -> list[str]:
    """The result lines of the demo's runs, in the order they ran."""
    return RESULT.findall(log)


def quoted_results(readme: str) -> list[str]:
    """The result lines inside the README's demo block."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"README.md must hold the demo block once: {BEGIN} ... {END}")
    block = readme[readme.index(BEGIN):readme.index(END)]
    return RESULT.findall(block)


def _comparable(line: str) -> str:
    return SECONDS.sub("<time> s, ", line.strip())


def differences(printed: list[str], quoted: list[str]) -> list[str]:
    """One sentence per line that differs (times aside); empty when the README is true."""
    if not printed:
        return ["the demo's output holds no result line (did `make demo` finish?)"]
    if len(printed) != len(quoted):
        return [f"the demo printed {len(printed)} result lines, the README quotes "
                f"{len(quoted)}"]
    return [f"run {i + 1}: the demo printed\n  {p}\nbut the README says\n  {q}"
            for i, (p, q) in enumerate(zip(printed, quoted))
            if _comparable(p) != _comparable(q)]


def write(printed: list[str], readme: str) -> str:
    """The README with its demo block holding `printed`."""
    quoted_results(readme)  # the block exists once
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    block = "\n```text\n" + "\n".join(line.strip() for line in printed) + "\n```\n"
    return head + BEGIN + block + END + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.readme_demo", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", metavar="LOG", help="the output of `make demo`")
    action.add_argument("--write", metavar="LOG", help="quote this output in the README")
    args = parser.parse_args(argv)
    log = Path(args.check or args.write).read_text(errors="replace")
    readme = README.read_text()
    if args.write:
        README.write_text(write(printed_results(log), readme))
        return 0
    problems = differences(printed_results(log), quoted_results(readme))
    for problem in problems:
        print(f"README.md's demo results are stale: {problem}", file=sys.stderr)
    if not problems:
        print(f"README.md's {len(quoted_results(readme))} demo result lines are what "
              "`make demo` printed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
