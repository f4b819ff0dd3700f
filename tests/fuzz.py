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
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BOUND_S = 10.0  # the longest a dry run may take on any input
MAX_PIXELS = 1_000_000  # the image door's data.max_pixels

outcomes: Counter[tuple[str, str]] = Counter()


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


@contextlib.contextmanager
def _time_box(seconds: float):
    """Raise TimeoutError in this (main) thread after `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def dry_run(door: str, argv: list[str]) -> None:
    """conadv-train --dry-run in this process; the property every input must hold."""
    from conadv.cli.train import main

    stderr = io.StringIO()
    code: int | str | None = None
    started = time.monotonic()
    try:
        with _time_box(BOUND_S), contextlib.redirect_stderr(stderr), \
                contextlib.redirect_stdout(io.StringIO()):
            main(["--dry-run", *argv])
    except SystemExit as finished:
        code = finished.code
    except TimeoutError:
        outcomes[(door, "hang")] += 1
        raise AssertionError(f"conadv-train --dry-run {argv!r} gave no answer within "
                             f"{BOUND_S} s") from None
    except Exception as err:  # a traceback instead of one sentence
        outcomes[(door, "traceback")] += 1
        raise AssertionError(f"conadv-train --dry-run {argv!r} raised "
                             f"{type(err).__name__}: {err}") from err
    text = stderr.getvalue()
    errors = [line for line in text.splitlines() if "error:" in line]
    if code == 2 and len(errors) == 1 and "Traceback" not in text:
        outcomes[(door, "one sentence")] += 1
    elif code in (0, None):
        outcomes[(door, "accepted")] += 1
    else:
        outcomes[(door, f"exit {code}")] += 1
        raise AssertionError(f"conadv-train --dry-run {argv!r}: exit {code}, {text[-500:]}")
    assert time.monotonic() - started < BOUND_S


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
    """A real PNG or JPEG (via PIL), or a hand-made PNG whose header and data may disagree;
    then maybe cut, flipped or extended."""
    kind = draw(st.sampled_from(["pil-png", "pil-jpeg", "raw-png"]))
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
                kind == "pil-png" and mode == "CMYK"):  # what each format cannot store
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if kind == "pil-png" else "JPEG")
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


# ------------------------------------------------------------------ make fuzz

def run_all(cases: int) -> Counter:
    """Every door, `cases` spread over them; the outcomes by door."""
    outcomes.clear()
    share = max(1, cases // 4)
    child = DecodeChild()
    try:
        for door in (config_door(share), yaml_door(share), image_door(share, child),
                     checkpoint_door(share)):
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
