"""The drawing in docs/ARCHITECTURE.md is the code's import graph, and the layers hold."""

import ast
import re
from collections import defaultdict

from tests.helpers import REPO

PACKAGE = REPO / "conadv"


def _unit(path) -> str:
    """A package (first directory under conadv/) or a top-level module."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_units() -> dict[str, set[str]]:
    """unit -> the other units its modules import."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "conadv" and len(parts) > 1 and parts[1] != unit:
                    edges[unit].add(parts[1])
    return edges


def drawn_units() -> dict[str, set[str]]:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"## Modules and dependencies.*?```text\n(.*?)```", text, re.S).group(1)
    edges: dict[str, set[str]] = {}
    for line in block.strip().splitlines():
        source, _, targets = line.partition("->")
        edges[source.strip()] = {t.strip() for t in targets.split(",") if t.strip()}
    return edges


def test_the_drawn_arrows_are_the_imports():
    drawn, real = drawn_units(), imported_units()
    missing = {f"{u} -> {v}" for u, vs in real.items() for v in vs if v not in drawn.get(u, ())}
    invented = {f"{u} -> {v}" for u, vs in drawn.items() for v in vs if v not in real.get(u, ())}
    assert not missing, f"imports not drawn in docs/ARCHITECTURE.md: {sorted(missing)}"
    assert not invented, f"arrows drawn that no import makes: {sorted(invented)}"


def test_nothing_below_the_training_loop_imports_it():
    real = imported_units()
    for unit in ("distill", "models", "data", "optim", "adversarial", "checkpoints"):
        assert "train" not in real.get(unit, set()), unit
        assert "cli" not in real.get(unit, set()), unit


def _listed(heading: str) -> list[str]:
    """The backticked conadv paths of the ARCHITECTURE.md paragraph that starts with
    `heading` (a directory ends with /)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    paragraph = re.search(re.escape(heading) + r"(.*?)\n\n", text, re.S).group(1)
    return [p for p in re.findall(r"`([\w/]+(?:\.py|/))`", paragraph)
            if not p.startswith("tests/")]


def test_the_reading_list_of_one_conadv_step_is_what_the_step_runs(tmp_path):
    """A step of ConAdv (tau = 1, the second one: the queue is full) traced by the functions it
    calls: every file of the reading list runs, and nothing runs outside the list and the
    one-job helpers below it. (sys.setprofile, not settrace: the suite's coverage owns that.)"""
    import sys

    from conadv.train.trainer import Trainer
    from tests.helpers import CPU, SINGLE, tiny_config

    reading, below = _listed("**Reading one ConAdv step**"), _listed("**Below them")
    assert len(reading) <= 8 and len(below) >= 5, (reading, below)
    trainer = Trainer(tiny_config(tmp_path / "run", "adv.enabled=true", "adv.tau=1",
                                  "train.max_steps=4"),
                      SINGLE, CPU)
    trainer.train_step()
    ran: set[str] = set()
    root = str(PACKAGE) + "/"

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            ran.add(frame.f_code.co_filename[len(root):])

    sys.setprofile(profile)
    try:
        trainer.train_step()
    finally:
        sys.setprofile(None)
    assert set(reading) <= ran, f"listed but never run: {set(reading) - ran}"
    unlisted = {f for f in ran if f not in reading
                and not any(f == b or (b.endswith("/") and f.startswith(b)) for b in below)}
    assert not unlisted, f"a ConAdv step runs files ARCHITECTURE.md does not list: {unlisted}"
