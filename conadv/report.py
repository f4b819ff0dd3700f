"""Run reports: figures and a table from run directories (config.yaml, metrics.jsonl,
summary.json), for one run or several overlaid, each labelled by what differs in its config.

Reading only: a report never changes a run directory. matplotlib draws headless (Agg).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conadv.config import RunConfig, flat_config, parse_saved_config
from conadv.errors import DataError

log = logging.getLogger(__name__)

# per-step training curves (metrics.jsonl 'train' records): figure file, title, keys drawn
TRAIN_FIGURES = {
    "loss.png": ("training loss per view", ("loss", "clean_loss", "aug_loss", "adv_loss")),
    "lr.png": ("learning rate", ("lr",)),
    "throughput.png": ("training images/s", ("img_per_s",)),
}
EVAL_FIGURE = ("accuracy.png", "test top-1 (solid), robust top-1 (dashed), train top-1 (dotted)")


@dataclass
class Run:
    path: Path
    config: RunConfig
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    label: str = ""


def load_run(path: Path) -> Run:
    """A run directory as written by conadv-train (a missing summary means unfinished)."""
    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / "metrics.jsonl").is_file():
        raise DataError(f"{path} is not a run directory (config.yaml and metrics.jsonl "
                        "are missing)")
    try:
        text = (path / "config.yaml").read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path / 'config.yaml'} is not a conadv config ({err})") from None
    config = parse_saved_config(text, str(path / "config.yaml"))
    run = Run(path, config)
    skipped = 0
    for line in (path / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:  # a run killed mid-write leaves a torn last line; skip what is not a record
            record = json.loads(line)
        except ValueError:
            skipped += bool(line.strip())
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            skipped += 1
            continue
        record = _measured(record)
        (run.train if record.get("kind") == "train" else run.eval).append(record)
    if skipped:
        log.warning("%s: skipped %d metrics lines that are not records", path, skipped)
    try:
        summary = json.loads((path / "summary.json").read_text())
        run.summary = summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        pass  # unfinished, or torn: the report says what the metrics say
    return run


def _measured(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record's numbers (and its kind and run): a value of another type in a
    hand-edited or foreign file ("top1": "n/a") is left out rather than plotted or subtracted."""
    return {key: value for key, value in record.items() if key in ("kind", "run") or (
        isinstance(value, int | float) and not isinstance(value, bool))}


def label_runs(runs: list[Run]) -> None:
    """Label each run by the config keys whose values differ between the runs (log paths
    excepted); a single run is labelled by its directory name."""
    flat = [flat_config(run.config) for run in runs]
    differing = [key for key in flat[0] if not key.startswith("log.")
                 and len({repr(f.get(key)) for f in flat}) > 1]
    for run, values in zip(runs, flat):
        parts = [f"{key}={_short(values[key])}" for key in differing]
        run.label = ", ".join(parts) if parts else run.path.name


def _short(value: Any) -> str:
    """A config value as a label shows it: a list of sections by their non-default keys
    (distill.teachers=[{weights: runs/t1}])."""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        items = []
        for item in value:
            default = type(item)()
            keys = [f"{f.name}: {getattr(item, f.name)}" for f in dataclasses.fields(item)
                    if getattr(item, f.name) != getattr(default, f.name)]
            items.append("{" + ", ".join(keys) + "}")
        return "[" + ", ".join(items) + "]"
    return str(value)


def _figure(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    handles, _ = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_runs(runs: list[Run], out: Path) -> list[Path]:
    """One PNG per figure, every run overlaid in its own colour."""
    written = []
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for name, (title, keys) in TRAIN_FIGURES.items():
        fig, ax = _figure(title, title.split(" ")[-1] if name != "loss.png" else "loss")
        for run, colour in zip(runs, colours):
            for style, key in zip(("-", "--", ":", "-."), keys):
                points = [(r["step"], r[key]) for r in run.train if key in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=colour, label=f"{run.label}: {key}")
        _save(fig, out / name)
        written.append(out / name)
    name, title = EVAL_FIGURE
    fig, ax = _figure(title, "top-1 (%)")
    for run, colour in zip(runs, colours):
        for style, key in (("-", "top1"), ("--", "pgd"), (":", "train_top1")):
            points = [(r["step"], _metric(r, key)) for r in run.eval if _metric(r, key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", markersize=3, color=colour,
                        label=f"{run.label}: {_metric_name(run, key)}")
    _save(fig, out / name)
    written.append(out / name)
    return written


def _metric(record: dict[str, Any], key: str) -> float | None:
    if key == "pgd":  # pgd<k>_top1, whatever k was
        key = next((k for k in record if k.startswith("pgd") and k.endswith("_top1")), "")
    return record.get(key)


def _metric_name(run: Run, key: str) -> str:
    if key != "pgd":
        return key
    return next((k for r in run.eval for k in r if k.startswith("pgd") and k.endswith("_top1")),
                "pgd_top1")


def final_row(run: Run) -> dict[str, Any]:
    """The table row of a run: its last evaluation, gap, time, steps, batch."""
    last = run.eval[-1] if run.eval else {}
    summary = run.summary
    row = {"run": run.label, "top1": last.get("top1"), "pgd_top1": _metric(last, "pgd"),
           "train_top1": last.get("train_top1"), "gap": None,
           "wall_s": summary.get("train_time_s"), "steps": summary.get("steps", last.get("step")),
           "global_batch": run.config.train.global_batch,
           "finished": summary.get("finished", False)}
    if row["top1"] is not None and row["train_top1"] is not None:
        row["gap"] = row["train_top1"] - row["top1"]
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def write_table(rows: list[dict[str, Any]], path: Path, figures: list[Path]) -> None:
    header = ["run", "test top-1 %", "PGD top-1 %", "train top-1 %", "train-test gap",
              "wall time s", "steps", "global batch", "finished"]
    keys = ["run", "top1", "pgd_top1", "train_top1", "gap", "wall_s", "steps", "global_batch",
            "finished"]
    lines = ["# conadv run report", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in keys) + " |" for row in rows]
    lines += ["", *[f"![{f.stem}]({f.name})" for f in figures], ""]
    path.write_text("\n".join(lines))


def build_report(run_dirs: list[Path], out: Path) -> Path:
    """Figures and report.md for the runs in `out`; returns the report's path."""
    runs = [load_run(Path(p)) for p in run_dirs]
    label_runs(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a directory for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the report directory {out}: {err.strerror}") from None
    figures = plot_runs(runs, out)
    report = out / "report.md"
    write_table([final_row(run) for run in runs], report, figures)
    return report
