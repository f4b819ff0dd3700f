"""A fuzzer at the doors input comes through: generated input (Hypothesis) through the real
entry points, checked against what every input must get, not against a list of cases.

Doors and what each case must hold:
- `config`: `conadv-train --dry-run` with generated overrides (known keys and typos; huge,
  NaN, nested, unicode, YAML-alias values), in this process: exit 0 or 2; on 2 exactly one
  `error:` line and no traceback; done within BOUND_S.
- `yaml`: the same with a generated config file (nested mappings, anchors and aliases).
- `image`: generated PNG and JPEG files (valid, truncated, bytes flipped, sizes rewritten
  in the header, garbage appended) through conadv.data.decode in a child process, since a
  decoder crash takes its process with it: a uint8 [3, H, W] image within data.max_pixels, or
  UnreadableImage; the child survives.
- `checkpoint`: generated checkpoint folders (manifests of any JSON, state files of random
  bytes or of wrong-typed content) through conadv.checkpoints.format: `problem()` says None
  or one sentence, `load_state()` gives a mapping or CheckpointError; nothing else.
- `contents`: a real checkpoint, intact by its manifest, with mutated contents (parts and
  weights deleted, retyped, reshaped; the saved config replaced) through a resume,
  model.init_from and conadv-eval.
- `folder`: generated image folders (images of every format, cut and flipped; empty files;
  odd and unicode names; links to themselves, up the tree, out of the dataset, dangling;
  nested folders; flat val/ with labels files in four encodings, with duplicate, conflicting
  and dangling rows) through conadv-train and conadv-pack.
- `shards`: a packed dataset with its index edited (keys, shard names such as ../../x,
  sizes, sample fields) or its shard cut or flipped, through conadv-train.
- `command`: conadv-eval and conadv-report on a real run with generated options, values,
  targets and output paths (existing files, dangling links, links to another file).

The doors that run whole commands (the last four) also hold: nothing outside the command's
own output (run directory, pack folder, --out, --export) changed, while beside them lie a
file and a folder that links point to and another run's files; the commands run in this
process with the CLI's exit codes: 0, 2 (one `error:` line, no traceback) or 75.

`python -m tests.fuzz --cases 10000` (make fuzz) spreads the cases over the doors and prints
a table by door and outcome; tests/test_fuzz.py runs a short budget of each in the suite.
A failing case is shrunk by Hypothesis and reported with the input that fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

BOUND_S = 10.0  # the longest a dry run may take on any input
MAX_PIXELS = 1_000_000  # the image door's data.max_pixels

outcomes: Counter[tuple[str, str]] = Counter()
sentences: defaultdict[str, Counter[str]] = defaultdict(Counter)  # what each door was told


# ------------------------------------------------------------------ config and yaml doors

def _config_keys() -> list[str]:
    from conadv.config import RunConfig

    defaults = RunConfig()
    return [f"{section.name}.{knob.name}" for section in dataclasses.fields(RunConfig)
            for knob in dataclasses.fields(getattr(defaults, section.name))]


_VALUES = st.one_of(
    st.integers().map(str),
    st.integers(min_value=10**12, max_value=10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=24),
    st.sampled_from(["", "null", "true", "[[1]]", "[1, 2, 3]", "{a: 1}", "{}", "[]", "1e300",
                     "-1e300", "nan", "-inf", "&a [*a]", "0x10", "1_000", "'quoted'", "~",
                     "!!python/object:os.system ls", "\u00e9\u00e8", "\x00", "\\n"]),
)


def overrides_strategy() -> st.SearchStrategy[list[str]]:
    keys = st.one_of(st.sampled_from(_config_keys()),
                     st.text(alphabet="abcdefghijklmnopqrstuvwxyz._", min_size=1, max_size=24))
    return st.lists(st.tuples(keys, _VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4)


def _yaml_values(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.dictionaries(st.text(max_size=8), children, max_size=4),
                     st.lists(children, max_size=4))


YAML_TREES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                    st.text(max_size=12)), _yaml_values, max_leaves=12)


def yaml_text_strategy() -> st.SearchStrategy[str]:
    """A config file: a generated mapping (often the schema's sections), sometimes with an
    anchor and aliases that repeat it."""
    import yaml

    from conadv.config import RunConfig

    sections = st.sampled_from([f.name for f in dataclasses.fields(RunConfig)])
    tree = st.dictionaries(st.one_of(sections, st.text(max_size=8)), YAML_TREES, max_size=4)

    def with_aliases(data: tuple[dict, int]) -> str:
        document, repeats = data
        text = yaml.safe_dump(document, allow_unicode=True)
        if repeats:
            body = "[" + ", ".join(["*r"] * repeats) + "]"
            text += f"x0: &r {json.dumps(document)}\nx1: &s {body}\n"
        return text
    return st.tuples(tree, st.integers(min_value=0, max_value=12)).map(with_aliases)


class Expired(BaseException):
    """A case past its time bound: a BaseException, so that no `except Exception` (or
    `except OSError`, which TimeoutError is) of the code under test swallows it."""


@contextlib.contextmanager
def _time_box(seconds: float):
    """Raise Expired in this (main) thread after `seconds`."""
    def expired(signum, frame):
        raise Expired(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_command(door: str, main: Callable[[list[str]], None], argv: list[str],
                bound_s: float = BOUND_S) -> str:
    """One of the CLIs' `main` in this process, and the property every input must get: exit 0,
    or 2 with exactly one `error:` line and no traceback, within `bound_s` (no case sends a
    signal, so 75 is a failure too). Returns the outcome (also counted by door)."""
    stderr = io.StringIO()
    code: int | str | None = None
    started = time.monotonic()
    try:
        with _time_box(bound_s), contextlib.redirect_stderr(stderr), \
                contextlib.redirect_stdout(io.StringIO()):
            main(argv)
    except SystemExit as finished:
        code = finished.code
    except Expired:
        outcomes[(door, "hang")] += 1
        raise AssertionError(f"{argv!r} gave no answer within {bound_s} s") from None
    except Exception as err:  # a traceback instead of one sentence
        outcomes[(door, "traceback")] += 1
        raise AssertionError(f"{argv!r} raised {type(err).__name__}: {err}") from err
    text = stderr.getvalue()
    errors = [line for line in text.splitlines() if "error:" in line]
    sentences[door][errors[0][:120] if errors else f"exit {code}"] += 1
    if code == 2 and len(errors) == 1 and "Traceback" not in text:
        outcome = "one sentence"
    elif code in (0, None):
        outcome = "accepted"
    else:
        outcomes[(door, f"exit {code}")] += 1
        raise AssertionError(f"{argv!r}: exit {code}, {text[-500:]}")
    outcomes[(door, outcome)] += 1
    assert time.monotonic() - started < bound_s
    return outcome


def dry_run(door: str, argv: list[str]) -> None:
    """conadv-train --dry-run in this process."""
    from conadv.cli.train import main

    run_command(door, main, ["--dry-run", *argv])


def config_door(cases: int, derandomize: bool = False) -> Callable[[], None]:
    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(overrides_strategy())
    def door(overrides: list[str]) -> None:
        dry_run("config", overrides)
    return door


def yaml_door(cases: int, derandomize: bool = False) -> Callable[[], None]:
    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(yaml_text_strategy())
    def door(text: str) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "config.yaml"
            path.write_text(text)
            dry_run("yaml", ["--config", str(path)])
    return door


# ------------------------------------------------------------------ image door

def _png(width: int, height: int, colour: int, depth: int, interlace: int,
         pixels: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels))
            + chunk(b"IEND", b""))


@st.composite
def image_bytes(draw) -> bytes:
    """A real PNG, JPEG, GIF, WEBP or BMP (via PIL), or a hand-made PNG whose header and data
    may disagree; then maybe cut, flipped or extended."""
    kind = draw(st.sampled_from(["pil-png", "pil-jpeg", "raw-png", "pil-gif", "pil-webp",
                                 "pil-bmp"]))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    if kind == "raw-png":
        colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
        depth = draw(st.sampled_from([1, 2, 4, 8, 16, 3]))
        declared = draw(st.sampled_from([(width, height), (width * 1000, height * 1000),
                                         (30000, 30000), (0, height), (2**31 - 1, 1)]))
        pixels = draw(st.binary(max_size=4 * width * height + height))
        data = _png(*declared, colour, depth, draw(st.sampled_from([0, 1])), pixels)
    else:
        import numpy as np
        from PIL import Image

        mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "CMYK"]))
        seed = draw(st.integers(0, 2**16))
        array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
        image = Image.fromarray(array).convert(mode)
        if (kind == "pil-jpeg" and mode in ("RGBA", "P", "1")) or (
                kind != "pil-jpeg" and mode == "CMYK"):  # what each format cannot store
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format=kind.removeprefix("pil-").upper())
        data = buffer.getvalue()
    mutation = draw(st.sampled_from(["none", "cut", "flip", "append"]))
    if mutation == "cut" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif mutation == "flip" and data:
        at = draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=6))
        changed = bytearray(data)
        for position in at:
            changed[position] ^= draw(st.integers(1, 255))
        data = bytes(changed)
    elif mutation == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    return data


def _decode_server(connection) -> None:
    """The child: decode what the parent sends, answer with the outcome."""
    from conadv.data.decode import UnreadableImage, decode_rgb

    connection.send(("ready", ""))  # imported: the parent's time bound starts now
    while True:
        data = connection.recv_bytes()
        try:
            image = decode_rgb(data, MAX_PIXELS)
            ok = (image.dtype.is_floating_point is False and image.ndim == 3
                  and image.shape[0] == 3 and image.shape[1] * image.shape[2] <= MAX_PIXELS)
            connection.send(("decoded" if ok else f"bad image {tuple(image.shape)}", ""))
        except UnreadableImage as err:
            connection.send(("unreadable", str(err)))
        except Exception as err:  # noqa: BLE001 (reported: only UnreadableImage may leave)
            connection.send((f"raised {type(err).__name__}", str(err)[:200]))


class DecodeChild:
    """A decoding child process, restarted after it dies."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self._parent, child = self._context.Pipe()
        self._process = self._context.Process(target=_decode_server, args=(child,),
                                              daemon=True)
        self._process.start()
        if not self._parent.poll(120):  # start-up (torch's import) is not a case's time
            raise RuntimeError("the decoding child did not start")
        self._parent.recv()

    def decode(self, data: bytes) -> tuple[str, str]:
        with contextlib.suppress(OSError):  # a child that died already: its pipe is broken
            self._parent.send_bytes(data)
            if self._parent.poll(BOUND_S):
                with contextlib.suppress(EOFError):
                    return self._parent.recv()
        self._process.kill()
        self._process.join()
        code = self._process.exitcode
        self._start()
        return ("crash" if code not in (None, -9) else "hang", f"exit code {code}")

    def close(self) -> None:
        self._process.kill()
        self._process.join()


def image_door(cases: int, child: DecodeChild,
               derandomize: bool = False) -> Callable[[], None]:
    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(image_bytes())
    def door(data: bytes) -> None:
        outcome, detail = child.decode(data)
        outcomes[("image", outcome)] += 1
        assert outcome in ("decoded", "unreadable"), (outcome, detail, data[:64])
    return door


# ------------------------------------------------------------------ checkpoint door

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=10)),
                    lambda children: st.one_of(st.lists(children, max_size=3),
                                               st.dictionaries(st.text(max_size=8), children,
                                                               max_size=3)),
                    max_leaves=10)


@st.composite
def checkpoint_folders(draw) -> tuple[object, bytes]:
    """(manifest, state file bytes): a manifest of any JSON or one that matches the state
    file; the state random bytes, or torch.save of a value of the wrong kind."""
    import torch

    state_kind = draw(st.sampled_from(["bytes", "list", "string", "tensor-dict", "empty"]))
    buffer = io.BytesIO()
    if state_kind == "bytes":
        state = draw(st.binary(max_size=256))
    else:
        value = {"list": [1, 2], "string": "model", "empty": {},
                 "tensor-dict": {"step": 3, "model": {"w": torch.zeros(2)}}}[state_kind]
        torch.save(value, buffer)
        state = buffer.getvalue()
    if draw(st.booleans()):
        manifest: object = {"format": draw(st.sampled_from([2, 1, "2", None])),
                            "step": draw(st.one_of(st.just(7), st.integers(), st.text())),
                            "run_id": draw(st.one_of(st.text(max_size=8), st.integers())),
                            "files": {"state.pt": {"bytes": len(state),
                                                   "sha256": hashlib.sha256(state).hexdigest()}}}
    else:
        manifest = draw(JSON)
    return manifest, state


def checkpoint_door(cases: int, derandomize: bool = False) -> Callable[[], None]:
    from conadv.checkpoints.format import load_state, problem
    from conadv.errors import CheckpointError

    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(checkpoint_folders())
    def door(folder: tuple[object, bytes]) -> None:
        manifest, state = folder
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "step-00000007"
            path.mkdir()
            (path / "manifest.json").write_text(json.dumps(manifest))
            (path / "state.pt").write_bytes(state)
            why = problem(path)
            assert why is None or (isinstance(why, str) and "\n" not in why), why
            if why is not None:
                outcomes[("checkpoint", "refused in one sentence")] += 1
                return
            try:
                loaded = load_state(path)
            except CheckpointError:
                outcomes[("checkpoint", "refused in one sentence")] += 1
                return
            assert isinstance(loaded, dict), type(loaded)
            outcomes[("checkpoint", "loaded")] += 1
    return door


# ------------------------------------------------------------------ checkpoint contents door

CONTENTS_BOUND_S = 60.0  # a resume, an init_from or an evaluation of the tiny model


def rewrite_state(checkpoint: Path, state: object) -> None:
    """Make `state` the checkpoint's state.pt, with a manifest that matches it: damage no
    checksum can see (files that are intact, with the wrong contents)."""
    import torch

    torch.save(state, checkpoint / "state.pt")
    data = (checkpoint / "state.pt").read_bytes()
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _tiny_args(run_dir: Path, *extra: str) -> list[str]:
    from tests.helpers import TINY

    return [*TINY, f"log.run_dir={run_dir}", "data.image_size=16", "data.eval_resize=16",
            "adv.enabled=true", *extra]


_trained: dict[str, Path] = {}


def trained_run(root: Path) -> Path:
    """A ConAdv run stopped at step 2 of 4 (made once per process, copied for each case)."""
    if "run" not in _trained:
        from conadv.cli.train import main

        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            main(_tiny_args(root / "trained", "train.max_steps=4", "train.stop_at_step=2"))
        _trained["run"] = root / "trained"
    return _trained["run"]


def _wrong_value(kind: str) -> object:
    import torch

    return {"none": None, "int": 5, "text": "text", "list": [1, 2], "empty": {},
            "mapping": {"x": 1}, "tensor": torch.zeros(2)}[kind]


WRONG_KINDS = st.sampled_from(["none", "int", "text", "list", "empty", "mapping", "tensor"])
SAVED_CONFIGS = st.sampled_from(["train: 5", "", "[1]", "model: {arch: 5}", "model: [1]",
                                 "a: [", "model: {arch: resnet18}",
                                 "model: {cifar_width: 16}", "\u00e9: {\u00e8: 1}"])


@st.composite
def state_mutations(draw) -> list[tuple[str, object, object]]:
    """Up to three edits of a saved state: (where, what, with): a top-level part deleted or
    replaced by a value of another kind, a weight deleted, reshaped, retyped or replaced, an
    entry inside a part (optimizer, engine, progress...) deleted or replaced, or the saved
    config text replaced."""
    edit = st.one_of(
        st.tuples(st.just("part"), st.sampled_from(["model", "config", "step", "optimizer",
                                                    "engine", "progress", "scaler", "format"]),
                  st.one_of(st.just("delete"), WRONG_KINDS)),
        st.tuples(st.just("weight"), st.integers(0, 10**6),
                  st.sampled_from(["delete", "reshape", "int", "text", "rename", "nan"])),
        st.tuples(st.just("inside"), st.tuples(st.sampled_from(["optimizer", "engine",
                                                                "progress", "scaler"]),
                                               st.integers(0, 100)),
                  st.one_of(st.just("delete"), WRONG_KINDS)),
        st.tuples(st.just("config"), st.just("text"), SAVED_CONFIGS))
    return draw(st.lists(edit, min_size=1, max_size=3))


def mutated(state: dict, edits: list[tuple[str, object, object]]) -> dict:
    import torch

    state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}
    for where, what, how in edits:
        if where == "part":
            state.pop(what, None) if how == "delete" else state.__setitem__(what,
                                                                            _wrong_value(how))
        elif where == "weight" and isinstance(state.get("model"), dict) and state["model"]:
            model = state["model"]
            key = sorted(model)[what % len(model)]
            value = model[key]
            if how == "delete":
                del model[key]
            elif how == "rename":
                model[key + "_renamed"] = model.pop(key)
            elif how == "text":
                model[key] = "text"
            elif isinstance(value, torch.Tensor):
                model[key] = {"reshape": lambda t: torch.zeros(t.numel() + 1),
                              "int": lambda t: t.long(),
                              "nan": lambda t: torch.full_like(t.float(), float("nan"))}[how](
                                  value)
        elif where == "inside" and isinstance(state.get(what[0]), dict) and state[what[0]]:
            part = state[what[0]]
            key = sorted(part, key=str)[what[1] % len(part)]
            part.pop(key) if how == "delete" else part.__setitem__(key, _wrong_value(how))
        elif where == "config":
            state["config"] = how
    return state


def contents_door(cases: int, derandomize: bool = False) -> Callable[[], None]:
    """Valid checkpoints (manifest and checksum right) holding mutated contents, through the
    three commands that read one: a resume, a new run's model.init_from, conadv-eval."""
    import shutil

    import torch

    from conadv.cli.evaluate import main as evaluate
    from conadv.cli.train import main as train

    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(state_mutations(), st.sampled_from(["resume", "init_from", "conadv-eval"]))
    def door(edits: list[tuple[str, object, object]], command: str) -> None:
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory)
            run = root / "run"
            shutil.copytree(trained_run(_cache_root()), run)
            checkpoint = run / "checkpoints" / "step-00000002"
            state = torch.load(checkpoint / "state.pt", weights_only=True)
            rewrite_state(checkpoint, mutated(state, edits))
            if command == "resume":
                run_command("contents", train, _tiny_args(run, "train.max_steps=4",
                                                          "checkpoint.resume=auto"),
                            CONTENTS_BOUND_S)
            elif command == "init_from":
                run_command("contents", train, _tiny_args(root / "new", "train.max_steps=1",
                                                          f"model.init_from={checkpoint}"),
                            CONTENTS_BOUND_S)
            else:
                run_command("contents", evaluate, ["--checkpoint", str(checkpoint)],
                            CONTENTS_BOUND_S)
    return door


_cache: list[tempfile.TemporaryDirectory] = []


def _cache_root() -> Path:
    """A folder that lives as long as the process (the trained run every case copies)."""
    if not _cache:
        _cache.append(tempfile.TemporaryDirectory(prefix="conadv-fuzz-"))
    return Path(_cache[0].name)


# ------------------------------------------------------------------ image folder door

FOLDER_BOUND_S = 60.0
EXTENSIONS = [".jpg", ".JPEG", ".png", ".gif", ".webp", ".bmp", ".txt", ""]
ODD_NAMES = st.one_of(
    st.sampled_from(["a", "b b", "-rf", "\u00e9t\u00e9", "\u65e5\u672c", "x" * 200, "con",
                     "a\nb", "..a", "[x]", "*", ".hidden", "a;b", "\u200b"]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"),
            min_size=1, max_size=12).filter(lambda n: n not in (".", "..")
                                            and len(n.encode()) < 200))
LINKS = st.sampled_from(["self", "parent", "sandbox", "victim-file", "outside-folder",
                         "dangling", "sibling"])


@st.composite
def folder_entries(draw, depth: int = 0) -> list[tuple]:
    """What one class folder holds: images (any of image_bytes), empty files, links (back to
    itself, up the tree, out of the dataset, dangling) and, one level down, folders."""
    kinds = ["clean", "clean", "clean", "image", "empty", "link"] + (
        ["folder"] if depth == 0 else [])
    entries = []
    for kind in draw(st.lists(st.sampled_from(kinds), max_size=6)):
        name = draw(ODD_NAMES)
        if kind == "clean":  # most files of a real folder decode: the run gets to train
            entries.append(("image", name + draw(st.sampled_from(EXTENSIONS[:6])),
                            _clean_image(draw(st.integers(0, 2**16)))))
        elif kind == "image":
            entries.append(("image", name + draw(st.sampled_from(EXTENSIONS)),
                            draw(image_bytes())))
        elif kind == "empty":
            entries.append(("empty", name + draw(st.sampled_from(EXTENSIONS)), b""))
        elif kind == "link":
            entries.append(("link", name, draw(LINKS)))
        else:
            entries.append(("folder", name, draw(folder_entries(depth=1))))
    return entries


def _clean_image(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    size = tuple(int(n) for n in rng.integers(8, 40, 2))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(
        buffer, format=["PNG", "JPEG", "GIF", "WEBP", "BMP"][seed % 5])
    return buffer.getvalue()


def _write_entries(folder: Path, entries: list[tuple], sandbox: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, name, content in entries:
        path = folder / name
        if path.exists() or path.is_symlink():
            continue
        if kind in ("image", "empty"):
            path.write_bytes(content)
        elif kind == "folder":
            _write_entries(path, content, sandbox)
        else:
            target = {"self": folder, "parent": folder.parent, "sandbox": sandbox,
                      "victim-file": sandbox / "outside" / "victim.png",
                      "outside-folder": sandbox / "outside",
                      "dangling": sandbox / "nowhere",
                      "sibling": folder.parent / "c0"}[content]
            path.symlink_to(target)


@st.composite
def image_folders(draw) -> dict:
    """An image folder with train/ and val/ (class folders, or a flat val/ and a labels file in
    any encoding, with duplicate, conflicting and dangling rows), and the command that reads it."""
    classes = draw(st.lists(folder_entries(), min_size=1, max_size=3))
    classes = [[("image", "first.png", _clean_image(number))] + entries  # most folders have
               if draw(st.booleans()) else entries                      # one good image
               for number, entries in enumerate(classes)]
    flat = draw(st.booleans())
    val = draw(folder_entries()) if flat else draw(st.lists(folder_entries(), min_size=1,
                                                            max_size=3))
    rows = draw(st.lists(st.tuples(st.one_of(ODD_NAMES, st.sampled_from(["v0", "v1"])),
                                   st.sampled_from(["c0", "c1", "c2", "0", "7", "", "n01"])),
                         max_size=6))
    header = draw(st.sampled_from(["ImageId,PredictionString\n", "", "\ufeffImageId,Pred\n"]))
    text = header + "".join(f"{image},{label} 1 2 3 4\n" if header else f"{image} {label}\n"
                            for image, label in rows)
    encoding = draw(st.sampled_from(["utf-8", "latin-1", "utf-16", "cp1252"]))
    return {"classes": classes, "flat": flat, "val": val,
            "labels": text.encode(encoding, errors="replace"),
            "command": draw(st.sampled_from(["train", "pack"])),
            "bad_images": draw(st.sampled_from(["skip", "fail"]))}


def snapshot(root: Path, leave: tuple[Path, ...]) -> dict[str, tuple]:
    """Every entry below `root` but those under `leave`: kind, size, modification time, link
    target (what a command must not change outside its own output)."""
    seen = {}
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        subdirs[:] = [d for d in subdirs if here / d not in leave]
        for name in subdirs + [f for f in files if here / f not in leave]:
            path = here / name
            status = path.lstat()  # a folder's time changes with its entries, seen apart
            seen[str(path.relative_to(root))] = (
                status.st_mode, status.st_size if not path.is_dir() else None,
                status.st_mtime_ns if not path.is_dir() else None,
                os.readlink(path) if path.is_symlink() else None)
    return seen


def _sandbox(root: Path) -> None:
    """Beside the dataset: a file and a folder links may point to, and another run's files."""
    (root / "outside").mkdir()
    (root / "outside" / "victim.png").write_bytes(_png(2, 2, 2, 8, 0, b"\x00" * 14))
    (root / "other_run").mkdir()
    (root / "other_run" / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')


def folder_door(cases: int, derandomize: bool = False) -> Callable[[], None]:
    """Generated image folders through conadv-train (one step and its evaluation) and
    conadv-pack, in this process: exit 0, 2 or 75 with one sentence, within FOLDER_BOUND_S,
    and nothing outside the run directory or the pack's output changed."""
    from conadv.cli.pack import main as pack
    from conadv.cli.train import main as train

    good = [[("image", f"{n}.png", _clean_image(n)) for n in range(2)]] * 2
    usable = {"classes": good, "flat": False, "val": good, "labels": b"", "command": "train",
              "bad_images": "fail"}

    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(image_folders())
    @example(usable)  # one that trains, whatever is generated: the door is not vacuous
    def door(folder: dict) -> None:
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory)
            _sandbox(root)
            data = root / "data"
            for number, entries in enumerate(folder["classes"]):
                _write_entries(data / "train" / f"c{number}", entries, root)
            if folder["flat"]:
                _write_entries(data / "val", folder["val"], root)
                (root / "labels.csv").write_bytes(folder["labels"])
            else:
                for number, entries in enumerate(folder["val"]):
                    _write_entries(data / "val" / f"c{number}", entries, root)
            labels = [str(root / "labels.csv")] if folder["flat"] else []
            outputs = (root / "run", root / "packed", root / "cache")
            before = snapshot(root, outputs)
            previous = os.environ.get("CONADV_CACHE_DIR")
            os.environ["CONADV_CACHE_DIR"] = str(root / "cache")  # the index cache
            try:
                if folder["command"] == "train":
                    run_command("folder", train, _tiny_args(
                        root / "run", "data.name=imagefolder", f"data.root={data}",
                        "train.max_steps=1", "train.global_batch=2", "data.max_pixels=1000000",
                        f"data.bad_images={folder['bad_images']}",
                        *[f"data.val_labels={path}" for path in labels]), FOLDER_BOUND_S)
                else:
                    run_command("folder", pack, [
                        str(data), str(root / "packed"),
                        *(["--skip-unreadable"] if folder["bad_images"] == "skip" else []),
                        *[f"--val-labels={path}" for path in labels]], FOLDER_BOUND_S)
            finally:
                if previous is None:
                    os.environ.pop("CONADV_CACHE_DIR", None)
                else:
                    os.environ["CONADV_CACHE_DIR"] = previous
            after = snapshot(root, outputs)
            changed = sorted(key for key in before.keys() | after.keys()
                             if before.get(key) != after.get(key))
            assert not changed, f"changed outside its output: {changed[:5]}"
    return door


# ------------------------------------------------------------------ shard index door

SHARD_VALUES = st.sampled_from(["../../outside/victim.png", "/etc/passwd", "..", "", ".",
                                "train-000000.tar", -1, 0, 10**12, 1.5, "text", None, True,
                                [], {}])


@st.composite
def shard_edits(draw) -> list[tuple]:
    """Edits of a packed dataset: index keys deleted or replaced, a shard's name or size, a
    sample's field, or the shard file's bytes cut or flipped."""
    edit = st.one_of(
        st.tuples(st.just("key"), st.sampled_from(["classes", "shards", "samples", "skipped"]),
                  st.one_of(st.just("delete"), SHARD_VALUES)),
        st.tuples(st.just("shard"), st.sampled_from(["name", "bytes"]), SHARD_VALUES),
        st.tuples(st.just("sample"), st.tuples(st.integers(0, 50), st.integers(0, 5)),
                  SHARD_VALUES),
        st.tuples(st.just("file"), st.sampled_from(["cut", "flip", "empty"]),
                  st.integers(0, 10**6)))
    return draw(st.lists(edit, min_size=1, max_size=3))


def _edit_shards(packed: Path, edits: list[tuple]) -> None:
    path = packed / "train.index.json"
    index = json.loads(path.read_text())
    shard_file = packed / index["shards"][0]["name"]
    for kind, what, value in edits:
        if kind == "key":
            index.pop(what, None) if value == "delete" else index.__setitem__(what, value)
        elif kind == "shard" and isinstance(index.get("shards"), list) and index["shards"]:
            if isinstance(index["shards"][0], dict):
                index["shards"][0][what] = value
        elif kind == "sample" and isinstance(index.get("samples"), list) and index["samples"]:
            sample = index["samples"][what[0] % len(index["samples"])]
            if isinstance(sample, list) and sample:
                sample[what[1] % len(sample)] = value
        elif kind == "file" and shard_file.is_file():
            data = bytearray(shard_file.read_bytes())
            if what == "cut":
                data = data[:value % max(1, len(data))]
            elif what == "flip" and data:
                data[value % len(data)] ^= 0xFF
            else:
                data = bytearray()
            shard_file.write_bytes(bytes(data))
    path.write_text(json.dumps(index))


def packed_dataset(root: Path) -> Path:
    """A small packed image folder (made once per process, copied for each case)."""
    if "packed" not in _trained:
        from conadv.data.shards import pack_image_folder
        from tests.helpers import jpeg_folder

        jpeg_folder(root / "folder")
        pack_image_folder(root / "folder", root / "packed")
        _trained["packed"] = root / "packed"
    return _trained["packed"]


def shards_door(cases: int, derandomize: bool = False) -> Callable[[], None]:
    """Edited shard indexes and shards through conadv-train (data.name=shards): one sentence
    or a run, and nothing outside the run directory read-write (the victim beside the shards
    is never changed; whether it is read is shard_index's refusal, tested in test_bad_input)."""
    import shutil

    from conadv.cli.train import main as train

    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(shard_edits())
    def door(edits: list[tuple]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory)
            _sandbox(root)
            shutil.copytree(packed_dataset(_cache_root()), root / "shards")
            _edit_shards(root / "shards", edits)
            before = snapshot(root, (root / "run",))
            run_command("shards", train, _tiny_args(
                root / "run", "data.name=shards", f"data.root={root / 'shards'}",
                "train.max_steps=1", "train.global_batch=4", "data.image_size=16"),
                FOLDER_BOUND_S)
            assert snapshot(root, (root / "run",)) == before
    return door


# ------------------------------------------------------------------ command door

PATH_KINDS = st.sampled_from(["new", "existing-file", "dangling-link", "link-to-victim",
                              "folder", "missing-parent", "the-run"])


def _first_missing(path: Path, root: Path) -> Path:
    """The highest folder of `path` that does not exist yet (a command may create it)."""
    while not path.parent.exists() and path.parent != root:
        path = path.parent
    return path


def _path_of(kind: str, root: Path, name: str) -> Path:
    """A path of the given kind in the sandbox (made as it says)."""
    path = root / "out" / name
    path.parent.mkdir(exist_ok=True)
    if kind == "existing-file":
        path.write_bytes(b"the user's file")
    elif kind == "dangling-link":
        path.symlink_to(root / "nowhere" / name)
    elif kind == "link-to-victim":
        path.symlink_to(root / "outside" / "victim.png")
    elif kind == "folder":
        path.mkdir()
    elif kind == "missing-parent":
        path = root / "out" / "no" / "such" / name
    elif kind == "the-run":
        path = root / "run"
    return path


@st.composite
def command_lines(draw) -> dict:
    """conadv-eval or conadv-report with generated options, paths and overrides."""
    command = draw(st.sampled_from(["eval", "report"]))
    target = draw(st.sampled_from(["run", "checkpoint", "other_run", "missing", "victim",
                                   "outside"]))
    if command == "eval":
        options = draw(st.lists(st.sampled_from(
            ["--robust", "--ema", "--force", "--sharpness", "--export", "--sharpness-rho",
             "--sharpness-images", "--autoattack-images"]), unique=True, max_size=4))
        values = {"--sharpness-rho": draw(st.sampled_from(["nan", "-1", "0", "1e-3", "x",
                                                           "1e300", "inf"])),
                  "--sharpness-images": draw(st.sampled_from(["4", "0", "-3", "x"])),
                  "--autoattack-images": draw(st.sampled_from(["2", "0", "x"])),
                  "--export": draw(PATH_KINDS)}
    else:
        options, values = ["--out"], {"--out": draw(PATH_KINDS)}
    overrides = draw(st.lists(st.sampled_from(
        ["eval.epsilon=0.01", "eval.pgd_steps=1", "data.workers=0", "eval.epsilon=nan",
         "model.arch=resnet18", "data.name=synthetic", "nosuch.key=1", "train.seed=-1"]),
        max_size=2)) if command == "eval" else []
    return {"command": command, "target": target, "options": options, "values": values,
            "overrides": overrides}


def command_door(cases: int, derandomize: bool = False) -> Callable[[], None]:
    """conadv-eval and conadv-report on a real run, with generated options: one sentence or
    a result, and nothing changed but the output they were given."""
    import shutil

    from conadv.cli.evaluate import main as evaluate
    from conadv.cli.report import main as report

    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(command_lines())
    def door(line: dict) -> None:
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory)
            _sandbox(root)
            shutil.copytree(trained_run(_cache_root()), root / "run")
            target = {"run": root / "run", "other_run": root / "other_run",
                      "checkpoint": root / "run" / "checkpoints" / "step-00000002",
                      "missing": root / "missing", "victim": root / "outside" / "victim.png",
                      "outside": root / "outside"}[line["target"]]
            argv, outputs = [], []
            for option in line["options"]:
                value = line["values"].get(option)
                if option in ("--export", "--out"):
                    value = _path_of(value, root, "model.pth" if option == "--export" else
                                     "report")
                    outputs.append(_first_missing(value, root))
                argv += [option] if value is None else [option, str(value)]
            before = snapshot(root, tuple(outputs))
            if line["command"] == "eval":
                run_command("command", evaluate, [  # PGD-2: the options are what is tested
                    "--checkpoint", str(target), *argv, "eval.pgd_steps=2", *line["overrides"]],
                    CONTENTS_BOUND_S)
            else:
                run_command("command", report, [*argv, str(target)], CONTENTS_BOUND_S)
            after = snapshot(root, tuple(outputs))
            changed = sorted(key for key in before.keys() | after.keys()
                             if before.get(key) != after.get(key))
            assert not changed, f"changed beside its output: {changed[:5]}"
    return door


# ------------------------------------------------------------------ make fuzz

def run_all(cases: int) -> Counter:
    """Every door, `cases` spread over them; the outcomes by door."""
    outcomes.clear()
    # the doors that run whole commands cost a second or more a case; the others milliseconds
    quick, whole = cases * 22 // 100, cases * 3 // 100
    child = DecodeChild()
    try:
        for door in (config_door(quick), yaml_door(quick), image_door(quick, child),
                     checkpoint_door(quick), contents_door(whole), folder_door(whole),
                     shards_door(whole), command_door(whole)):
            door()
    finally:
        child.close()
    return Counter(outcomes)


def table(counts: Counter) -> str:
    rows = ["| door | outcome | cases |", "|---|---|---|"]
    rows += [f"| {door} | {outcome} | {n:,} |" for (door, outcome), n in sorted(counts.items())]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        counts = run_all(args.cases)
    finally:
        print(table(Counter(outcomes)))
        print(f"{sum(outcomes.values()):,} cases in {time.monotonic() - started:.0f} s")
    return 0 if counts else 1


if __name__ == "__main__":
    sys.exit(main())
