"""Every line of conadv/ that the CPU suite never executes, named and grouped by why, in
docs/UNEXECUTED.md.

No GPU runs this project's suite, so a line the suite never executes is one a user's cluster
runs first. `make test` measures the suite's line coverage (coverage.py, subprocesses and
torchrun ranks included) and then runs `python -m tests.unexecuted --check`, which fails when
the list and the measurement disagree: a line that became unexecuted must be listed with its
reason (up to TOLERANCE such lines are reported without failing: a few branches depend on
timing, such as which of two deadlines fires first when a test freezes a rank, so a run may
or may not reach them); a listed line that now runs (or is gone) is reported, to be dropped
by `--write`, which rewrites the list from the last measurement (`--write --merge` keeps the
listed lines this run happened to reach, where they are still in the code).

A line is named by its file, the function it is in and its text (no line number, so an edit
elsewhere in the file does not change the list). Its reason comes from the branch it sits in:
a branch taken only on a CUDA device (`device.type == "cuda"`, `is_cuda`, `torch.cuda...`),
only under NCCL, only with DALI's GPU decoder, only in a multi-node job; or from the few
functions in REASONS that only such a machine calls. Every other unexecuted line is listed as
what it is: a line no CPU test reaches yet.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "conadv"
DOC = REPO / "docs" / "UNEXECUTED.md"

CUDA = "Needs a CUDA device"
NCCL = "Needs NCCL"
NVJPEG = "Needs DALI's GPU decoder (nvJPEG)"
MULTI_NODE = "Needs a multi-node job"
GAP = "No CPU test reaches it yet"
ORDER = (CUDA, NCCL, NVJPEG, MULTI_NODE, GAP)
TOLERANCE = 10  # unlisted lines reported but not failed (timing-dependent branches)

# a branch's condition -> the reason its taken side needs (the other side is the CPU's)
_CONDITIONS = [
    (re.compile(r"""(==\s*["']cuda["'])|(!=\s*["']cpu["'])|\bis_cuda\b|"""
                r"""torch\.cuda\.is_available\(\)"""),
     re.compile(r"""(!=\s*["']cuda["'])|(==\s*["']cpu["'])"""), CUDA),
    (re.compile(r"""==\s*["']nccl["']"""), re.compile(r"""!=\s*["']nccl["']"""), NCCL),
    (re.compile(r"^mixed$"), None, NVJPEG),  # conadv/data/dali.py's GPU decoder
]

# whole functions (or classes) that only such a machine calls: (file, qualified name prefix)
REASONS: dict[tuple[str, str], str] = {
    ("conadv/streams.py", "CudaStreams"): CUDA,
}


@dataclass(frozen=True, order=True)
class Line:
    reason: str
    path: str  # relative to the repository
    scope: str  # the enclosing function or class, dotted; "<module>" at the top
    text: str  # the line, stripped

    def entry(self) -> str:
        return f"- `{self.scope}`: `{self.text}`"


def _scopes(tree: ast.AST) -> dict[int, str]:
    """Line -> the dotted name of the innermost function or class holding it."""
    names: dict[int, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
                for line in range(child.lineno, (child.end_lineno or child.lineno) + 1):
                    names[line] = name
                visit(child, name)
            else:
                visit(child, prefix)

    visit(tree, "")
    return names


def _branch_reasons(tree: ast.AST, source: str) -> dict[int, str]:
    """Line -> the reason of the innermost device-specific branch it sits in."""
    reasons: dict[int, str] = {}

    def mark(statements: list[ast.stmt], reason: str) -> None:
        for statement in statements:
            for line in range(statement.lineno, (statement.end_lineno or statement.lineno) + 1):
                reasons[line] = reason

    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp))),
                   key=lambda n: n.lineno)
    for node in nodes:  # outer branches first, so inner ones override them
        condition = ast.get_source_segment(source, node.test) or ""
        for taken, negated, reason in _CONDITIONS:
            if isinstance(node, ast.IfExp):
                continue  # one-line choices: their line runs on the CPU too
            if taken.search(condition):
                mark(node.body, reason)
            elif negated is not None and negated.search(condition):
                mark(node.orelse, reason)
    return reasons


def classify(path: Path, missing: set[int]) -> list[Line]:
    """The unexecuted lines of one file, each with its reason."""
    source = path.read_text()
    tree = ast.parse(source)
    texts = source.splitlines()
    scopes, branches = _scopes(tree), _branch_reasons(tree, source)
    relative = path.relative_to(REPO).as_posix()
    lines = []
    for number in sorted(missing):
        scope = scopes.get(number, "<module>")
        reason = branches.get(number) or next(
            (why for (file, prefix), why in REASONS.items()
             if file == relative and (scope == prefix or scope.startswith(prefix + "."))), GAP)
        lines.append(Line(reason, relative, scope, texts[number - 1].strip()))
    return lines


def measured(data_file: Path) -> tuple[list[Line], int, int]:
    """(unexecuted lines, statements, executed statements) of conadv/ from coverage data."""
    import coverage

    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    lines, statements, executed = [], 0, 0
    for path in sorted(PACKAGE.rglob("*.py")):
        _, stmts, _, missing, _ = cov.analysis2(str(path))
        statements += len(stmts)
        executed += len(stmts) - len(missing)
        lines += classify(path, set(missing))
    return lines, statements, executed


def render(lines: list[Line], statements: int, executed: int) -> str:
    grouped: dict[str, dict[str, list[Line]]] = defaultdict(lambda: defaultdict(list))
    for line in sorted(lines):
        grouped[line.reason][line.path].append(line)
    out = ["# Lines the CPU suite never executes", "",
           "Written by `python -m tests.unexecuted --write` from the coverage that `make test` "
           "measures; `make test` fails when this list and the code disagree (see "
           "tests/unexecuted.py). Lines are named by file, function and text.", "",
           f"Line coverage of `conadv/` by the CPU suite: {executed:,} of {statements:,} "
           f"statements ({100 * executed / statements:.1f} %).", "",
           "| why | lines |", "|---|---|"]
    out += [f"| {reason} | {sum(len(v) for v in grouped[reason].values())} |"
            for reason in ORDER if reason in grouped]
    for reason in ORDER:
        if reason not in grouped:
            continue
        out += ["", f"## {reason}"]
        for path, entries in grouped[reason].items():
            out += ["", f"### {path}", ""] + [line.entry() for line in entries]
    return "\n".join(out) + "\n"


def listed(text: str) -> Counter[tuple[str, str, str]]:
    """The (reason, path, entry) triples of a written list (a line's text may repeat)."""
    entries: Counter[tuple[str, str, str]] = Counter()
    reason, path = "", ""
    for row in text.splitlines():
        if row.startswith("## "):
            reason = row[3:]
        elif row.startswith("### "):
            path = row[4:]
        elif row.startswith("- "):
            entries[(reason, path, row)] += 1
    return entries


def _still_in_the_code(reason: str, path: str, entry: str) -> bool:
    """Whether a listed line still exists in its file and function (whatever ran it)."""
    file = REPO / path
    if not file.is_file():
        return False
    source = file.read_text()
    scopes, texts = _scopes(ast.parse(source)), source.splitlines()
    return any(Line(reason, path, scopes.get(number, "<module>"), text.strip()).entry() == entry
               for number, text in enumerate(texts, start=1))


def _kept(text: str) -> list[Line]:
    """The lines docs/UNEXECUTED.md names that `text` (this run's list) does not, where they
    are still in the code: branches a run may or may not reach (which deadline fires first,
    what the fuzzer drew), so that the list holds what any run may miss."""
    kept = []
    for reason, path, entry in (listed(DOC.read_text()) - listed(text)).elements():
        named = re.fullmatch(r"- `(.*?)`: `(.*)`", entry)
        if named and _still_in_the_code(reason, path, entry):
            kept.append(Line(reason, path, named[1], named[2]))
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.unexecuted", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-file", type=Path, default=REPO / ".coverage")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--write", action="store_true")
    parser.add_argument("--merge", action="store_true",
                        help="with --write: keep the listed lines still in the code that this "
                        "run happened to execute (timing- or draw-dependent branches)")
    args = parser.parse_args(argv)
    lines, statements, executed = measured(args.data_file)
    text = render(lines, statements, executed)
    if args.write:
        if args.merge and DOC.exists():
            text = render(sorted([*lines, *_kept(text)]), statements, executed)
        DOC.write_text(text)
        print(f"wrote {DOC.relative_to(REPO)}: {len(lines)} unexecuted lines")
        return 0
    import torch

    if torch.cuda.is_available():  # the list is the CPU suite's; a GPU runs other lines
        print(f"{DOC.relative_to(REPO)} lists the CPU suite's unexecuted lines: not checked "
              "where CUDA is available")
        return 0
    now, written = listed(text), listed(DOC.read_text() if DOC.exists() else "")
    unlisted, stale = now - written, written - now
    gone = [entry for entry in stale if not _still_in_the_code(*entry)]
    for reason, path, entry in sorted(unlisted):
        print(f"unexecuted but not listed: {path} {entry[2:]} ({reason})", file=sys.stderr)
    for _, path, entry in sorted(stale):
        print(f"listed but executed in this run (or gone): {path} {entry[2:]}",
              file=sys.stderr)
    print(f"{DOC.relative_to(REPO)}: {len(lines)} lines unexecuted, {unlisted.total()} of them "
          f"unlisted, {stale.total()} listed lines executed")
    if gone:
        print(f"error: {len(gone)} lines named in {DOC.relative_to(REPO)} are no longer in "
              f"the code (e.g. {gone[0][1]} {gone[0][2][2:]}); run `python -m "
              "tests.unexecuted --write` after `make test`", file=sys.stderr)
        return 1
    if unlisted.total() > TOLERANCE:
        print(f"error: {unlisted.total()} lines of conadv/ are executed by no CPU test and not "
              f"named in {DOC.relative_to(REPO)}; test them, or read the lines above and run "
              "`python -m tests.unexecuted --write` to list them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
