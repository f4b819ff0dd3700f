"""Run directories and checkpoints a shared cluster can trust: no code runs from a checkpoint,
no run destroys or mixes with another, one run per directory, and every bad input is one
sentence (exit 2), checked also by a property-based test of the whole config surface."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conadv.train.run_directory import LOCK_FILE, Holder, RunDirectoryError, RunLock
from tests.helpers import REPO, TINY, run_module, subprocess_env, the_error_line, tiny_config


class _Payload:
    """What a hostile state.pt holds: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(directory: Path, marker: Path) -> Path:
    """A checkpoint directory whose manifest matches its state.pt, which runs code."""
    checkpoint = directory / "checkpoints" / "step-00000005"
    checkpoint.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"model": {}, "step": 5, "payload": _Payload(marker)}, buffer)
    data = buffer.getvalue()
    (checkpoint / "state.pt").write_bytes(data)
    (checkpoint / "manifest.json").write_text(json.dumps({
        "format": 2, "step": 5, "files": {"state.pt": {
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))
    return checkpoint


def _cli_error(capsys, main, argv: list[str]) -> str:
    """The entry point run in this process as the console script runs it: exit 2 and one
    'error:' line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exited.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def test_no_entry_point_runs_the_code_of_a_crafted_checkpoint(tmp_path, capsys):
    from conadv.cli import evaluate
    from conadv.cli import train as train_cli

    marker = tmp_path / "PWNED"
    hostile = tmp_path / "hostile_run"
    checkpoint = crafted_checkpoint(hostile, marker)
    cases = {
        "model.init_from": (train_cli, [*TINY, f"log.run_dir={tmp_path / 'a'}",
                                        f"model.init_from={hostile}"]),
        "distillation teacher": (train_cli, [*TINY, f"log.run_dir={tmp_path / 'b'}",
                                             "distill.enabled=true",
                                             f"distill.teachers=[{{weights: {hostile}}}]"]),
        "checkpoint.resume=PATH": (train_cli, [*TINY, f"log.run_dir={tmp_path / 'c'}",
                                               f"checkpoint.resume={checkpoint}"]),
        "checkpoint.resume=auto": (train_cli, [*TINY, f"log.run_dir={hostile}",
                                               "checkpoint.resume=auto"]),
        "conadv-eval": (evaluate, ["--config", str(REPO / "configs/demo.yaml"),
                                   "--checkpoint", str(checkpoint), "train.device=cpu"]),
    }
    for name, (entry_point, argv) in cases.items():
        error = _cli_error(capsys, entry_point.main, argv)
        assert "posix.system" in error and "was not loaded" in error, (name, error)
        assert not marker.exists(), name


def _fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_fresh_run_in_a_used_directory_stops_and_leaves_it_byte_identical(tmp_path, capsys):
    from conadv.cli import train as train_cli

    run = [*TINY, f"log.run_dir={tmp_path}"]
    _cli_output(capsys, train_cli.main, [*run, "train.max_steps=2"])
    before = _fingerprint(tmp_path)
    assert "run.json" in before and "metrics.jsonl" in before and LOCK_FILE not in before
    error = _cli_error(capsys, train_cli.main, [*run, "train.max_steps=3", "train.seed=1"])
    assert "holds another run" in error and "log.overwrite=true" in error
    assert _fingerprint(tmp_path) == before

    _cli_output(capsys, train_cli.main, [*run, "train.max_steps=3", "train.seed=1",
                                         "log.overwrite=true"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    assert {r["run"] for r in records} == {run_id}  # nothing of the first run is left
    assert max(r["step"] for r in records) == 3


def test_of_two_runs_started_together_in_one_directory_exactly_one_trains(tmp_path):
    run = [*TINY, f"log.run_dir={tmp_path}", "train.max_steps=40"]
    processes = [subprocess.Popen([sys.executable, "-m", "conadv.cli.train", *run], cwd=REPO,
                                  env=subprocess_env(), text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-1500:] for _, err in results]
    refused = next(err for code, err in results if code == 2)
    assert "is in use by another run (pid" in refused and socket.gethostname() in refused
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len({json.loads(r)["run"] for r in records}) == 1


def test_resume_auto_with_only_damaged_checkpoints_stops_and_overwrites_nothing(tmp_path):
    train_cfg = ["train.max_steps=2", "checkpoint.every_steps=1", "checkpoint.resume=auto"]
    from conadv.train.job import train

    train(tiny_config(tmp_path, *train_cfg))
    for checkpoint in (tmp_path / "checkpoints").iterdir():
        data = (checkpoint / "state.pt").read_bytes()
        (checkpoint / "state.pt").write_bytes(data[: len(data) // 2])
    before = _fingerprint(tmp_path)
    result = run_module("conadv.cli.train", *TINY, f"log.run_dir={tmp_path}", *train_cfg,
                        "train.max_steps=4")
    error = the_error_line(result)
    assert "every checkpoint in" in error and "is damaged" in error
    assert _fingerprint(tmp_path) == before


# ------------------------------------------------------------------ the lock


def _write_lock(directory: Path, **fields) -> None:
    holder = {**Holder.me().__dict__, **fields}
    (directory / LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_lock_is_taken_over_only_from_a_holder_that_is_provably_gone(tmp_path, monkeypatch):
    _write_lock(tmp_path, pid=_dead_pid(), start="1")  # this host, a pid that has ended
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()

    _write_lock(tmp_path, host="node-elsewhere", pid=1234)  # another host: may be running
    with pytest.raises(RunDirectoryError, match="pid 1234 on node-elsewhere"):
        RunLock(tmp_path).acquire()

    # a requeued Slurm job: the lock of its earlier attempt, from another node
    _write_lock(tmp_path, host="node-elsewhere", pid=1234,
                job={"slurm_job": "77", "slurm_restart": 0, "torchrun_job": None,
                     "torchrun_restart": 0})
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()

    (tmp_path / LOCK_FILE).write_text("{torn")
    with pytest.raises(RunDirectoryError, match="cannot be read"):
        RunLock(tmp_path).acquire()


def test_torchrun_restarts_take_over_only_their_own_agents_lock(tmp_path, monkeypatch):
    """torchrun's run id is not unique ("none" with static ranks, a fixed default elsewhere):
    an unrelated job on its second restart must not take over a live run's lock; a restart
    of the same agent (or, under Slurm, of the same job attempt) may."""
    live = {"slurm_job": None, "slurm_restart": 0, "torchrun_job": "none",
            "torchrun_restart": 0, "agent": "node-elsewhere:4321:99"}
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    _write_lock(tmp_path, host="node-elsewhere", pid=1234, job=live)
    with pytest.raises(RunDirectoryError, match="pid 1234 on node-elsewhere"):
        RunLock(tmp_path).acquire()
    same_agent = Holder.me().job["agent"]
    _write_lock(tmp_path, host="node-elsewhere", pid=1234, job={**live, "agent": same_agent})
    lock = RunLock(tmp_path)
    lock.acquire()  # an earlier restart of this very agent
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # an elastic restart inside one Slurm job attempt
    _write_lock(tmp_path, host="node-elsewhere", pid=1234, job={**live, "slurm_job": "78"})
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_of_runs_taking_over_one_stale_lock_at_once_exactly_one_wins(tmp_path, monkeypatch):
    """Both judge the lock stale before either moves it (a barrier inside the judgement)."""
    import threading

    judged = Holder.gone_for
    for attempt in range(10):
        directory = tmp_path / str(attempt)
        directory.mkdir()
        _write_lock(directory, pid=_dead_pid(), start="1")
        barrier = threading.Barrier(2)

        def judge_together(holder, me, barrier=barrier):
            why = judged(holder, me)
            barrier.wait(timeout=10)
            return why

        monkeypatch.setattr(Holder, "gone_for", judge_together)
        outcomes: list[object] = []

        def start(directory=directory, outcomes=outcomes):
            lock = RunLock(directory)
            try:
                lock.acquire()
                outcomes.append(lock)
            except RunDirectoryError as err:
                outcomes.append(err)

        threads = [threading.Thread(target=start) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        winners = [o for o in outcomes if isinstance(o, RunLock)]
        assert len(outcomes) == 2 and len(winners) == 1, outcomes
        assert "claimed by another run" in str(next(o for o in outcomes if o not in winners))
        winners[0].release()
        assert not list(directory.glob("LOCK*"))


def test_a_live_holder_on_this_host_is_never_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        from conadv.train.run_directory import _process_start

        _write_lock(tmp_path, pid=sleeper.pid, start=_process_start(sleeper.pid))
        with pytest.raises(RunDirectoryError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------ one sentence each


def _non_utf8_config(tmp_path: Path) -> list[str]:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  epochs: 2 # \xe9t\xe9\n".encode("latin-1"))
    return ["--config", str(path)]


def _duplicate_keys(tmp_path: Path) -> list[str]:
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    return ["--config", str(path)]


def _run_dir_is_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "file").write_text("x")
    return [*TINY, f"log.run_dir={tmp_path / 'file'}"]


def _run_dir_loop(tmp_path: Path) -> list[str]:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return [*TINY, f"log.run_dir={tmp_path / 'loop' / 'run'}"]


def _fifo_weights(tmp_path: Path) -> list[str]:
    os.mkfifo(tmp_path / "fifo")
    return [*TINY, f"log.run_dir={tmp_path / 'r'}", f"model.init_from={tmp_path / 'fifo'}"]


def _not_a_state_dict(tmp_path: Path) -> list[str]:
    torch.save({"a": 1}, tmp_path / "odd.pt")
    return [*TINY, f"log.run_dir={tmp_path / 'r'}", f"model.init_from={tmp_path / 'odd.pt'}"]


def _manifest_as_list(tmp_path: Path) -> list[str]:
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text("[1, 2]")
    (checkpoint / "state.pt").write_bytes(b"x")
    return [*TINY, f"log.run_dir={tmp_path / 'run'}", "checkpoint.resume=auto"]


def _another_architecture(tmp_path: Path) -> list[str]:
    from conadv.train.job import train

    train(tiny_config(tmp_path / "run", "train.max_steps=1"))
    return [*TINY, f"log.run_dir={tmp_path / 'run'}", "checkpoint.resume=auto",
            "checkpoint.allow_config_change=true", "model.cifar_width=16"]


def _root_without_train(tmp_path: Path) -> list[str]:
    (tmp_path / "data" / "val").mkdir(parents=True)
    return [*TINY, "data.name=imagefolder", f"data.root={tmp_path / 'data'}",
            f"log.run_dir={tmp_path / 'r'}"]


TRAIN_CASES = {
    "non-UTF-8 config": (_non_utf8_config, "is not UTF-8 text"),
    "duplicate YAML keys": (_duplicate_keys, "appears twice"),
    "a directory as --config": (lambda t: ["--config", str(t)], "is not a regular file"),
    "/dev/null as --config": (lambda t: ["--config", "/dev/null"], "is not a regular file"),
    "a 5,000-digit integer": (lambda t: [*TINY, "train.seed=" + "9" * 5000],
                              "(5002 characters)"),
    "a 100,000-character value": (lambda t: [*TINY, "optim.lr=" + "x" * 100_000],
                                  "(100002 characters)"),
    "adv.epsilon outside [0, 1]": (lambda t: [*TINY, "adv.epsilon=5"], "at most 1.0"),
    "warm-up longer than training": (lambda t: [*TINY, "schedule.warmup_epochs=3"],
                                     "longer than train.epochs"),
    "step_epochs of strings": (lambda t: [*TINY, "schedule.step_epochs=[a]"],
                               "type float, got 'a'"),
    "log.run_dir is a file": (_run_dir_is_a_file, "is a file, not a directory"),
    "log.run_dir in a symlink loop": (_run_dir_loop, "cannot be used"),
    "log.run_dir name too long": (lambda t: [*TINY, f"log.run_dir={t / ('x' * 300)}"],
                                  "File name too long"),
    "a FIFO as model.init_from": (_fifo_weights, "is not a regular file"),
    "init_from holding {'a': 1}": (_not_a_state_dict, "model.init_from: "),
    "a manifest that is a list": (_manifest_as_list, "manifest is malformed"),
    "another architecture on resume": (_another_architecture, "holds a model of another shape"),
    "data.root without train/": (_root_without_train, "train/<class>/<image>"),
}


def cli_error_in_process(capsys, main, *args: str) -> str:
    """A CLI's `main` run in this process (no interpreter start-up per case): exit status 2
    and exactly one 'error:' line on stderr, no traceback; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    err = capsys.readouterr().err
    assert exited.value.code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_a_bad_input_to_conadv_train_is_one_sentence(tmp_path, case, capsys):
    from conadv.cli.train import main

    arguments, expected = TRAIN_CASES[case]
    error = cli_error_in_process(capsys, main, *arguments(tmp_path))
    assert expected in error, error
    assert len(error) < 700


def test_a_read_only_run_directory_is_one_sentence(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    (tmp_path / "ro").mkdir(mode=0o500)
    error = the_error_line(run_module("conadv.cli.train", *TINY,
                                      f"log.run_dir={tmp_path / 'ro' / 'run'}"))
    assert "cannot be used" in error


def _trained_run(tmp_path: Path) -> Path:
    from conadv.train.job import train

    train(tiny_config(tmp_path / "run", "train.max_steps=1"))
    return tmp_path / "run"


def _cli_output(capsys, main, argv: list[str]) -> str:
    """stdout of an entry point run in this process that succeeds."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err[-3000:]
    return out


def test_conadv_eval_takes_the_checkpoints_config_and_refuses_bad_exports(tmp_path, capsys):
    from conadv.cli import evaluate

    run = _trained_run(tmp_path)
    out = _cli_output(capsys, evaluate.main, ["--checkpoint", str(run)])  # no --config
    assert json.loads(out.strip().splitlines()[-1])["count"] == 360
    (tmp_path / "taken.pth").write_text("someone else's file")
    for export, expected in ((tmp_path, "is a directory"),
                             (tmp_path / "missing" / "m.pth", "does not exist"),
                             (tmp_path / "taken.pth", "add --force")):
        error = _cli_error(capsys, evaluate.main, ["--checkpoint", str(run), "--export",
                                                   str(export)])
        assert expected in error, error
    assert (tmp_path / "taken.pth").read_text() == "someone else's file"
    _cli_output(capsys, evaluate.main, ["--checkpoint", str(run), "--export",
                                        str(tmp_path / "taken.pth"), "--force"])
    assert (tmp_path / "taken.pth").stat().st_size > 1000


def test_conadv_report_survives_a_torn_run_and_refuses_a_file_as_out(tmp_path, capsys):
    from conadv.cli import report

    run = _trained_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('[1, 2]\n"a string"\n{"kind": "train", "st')  # killed mid-write
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        report.main([str(run), "--out", str(tmp_path / "report")])
    assert exited.value.code in (0, None) and "skipped 3 metrics lines" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert "is a file" in _cli_error(capsys, report.main,
                                     [str(run), "--out", str(tmp_path / "file")])
    (run / "config.yaml").write_bytes(b"\xff\xfe\x00junk")
    assert "is not a conadv config" in _cli_error(capsys, report.main,
                                                  [str(run), "--out", str(tmp_path / "r2")])


def test_conadv_pack_checks_its_inputs_before_writing(tmp_path, capsys):
    import shutil

    from conadv.cli import pack
    from tests.helpers import jpeg_folder

    for args, expected in (([str(tmp_path / "none"), str(tmp_path / "o")], "no train/ folder"),
                           ([str(tmp_path), str(tmp_path / "o")], "no train/ folder")):
        assert expected in _cli_error(capsys, pack.main, args)
    jpeg_folder(tmp_path / "folder")
    (tmp_path / "out_file").write_text("x")
    assert "is a file" in _cli_error(capsys, pack.main, [str(tmp_path / "folder"),
                                                         str(tmp_path / "out_file")])
    for size in ("0", "-5"):
        error = _cli_error(capsys, pack.main, [str(tmp_path / "folder"), str(tmp_path / "o"),
                                               "--shard-mb", size])
        assert "positive number of MB" in error
    shutil.rmtree(tmp_path / "folder" / "val")
    assert "no val/ folder" in _cli_error(capsys, pack.main, [str(tmp_path / "folder"),
                                                              str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()  # refused before packing train/


# ------------------------------------------------------------------ the whole config surface

def _config_surface():
    """Overrides of every schema key, typos, and broken syntax, with values of every kind;
    and whole YAML files, well-formed or not."""
    import dataclasses

    from hypothesis import strategies as st

    from conadv.config import RunConfig

    keys = [f"{section.name}.{f.name}" for section in dataclasses.fields(RunConfig)
            for f in dataclasses.fields(section.default_factory())]
    keys += ["train", "train.", ".epochs", "trian.epochs", "train.epochs.x", "a.b.c", ""]
    scalars = st.one_of(st.integers(min_value=-10**6, max_value=10**6),
                        st.integers(4301, 6000).map(lambda n: "9" * n),  # past int()'s limit
                        st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                        st.text(max_size=30), st.sampled_from(
                            ["", "[", "{", "]", "null", "~", "!!python/object:os.system",
                             "[a, 1]", "{weights: x}", "1e999", "-0", "0x10", "yes", "'"]))
    values = st.one_of(scalars, st.lists(scalars, max_size=3).map(str),
                       st.dictionaries(st.text(max_size=8), scalars, max_size=3).map(str))
    override = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(keys), values)
    sections = st.dictionaries(st.sampled_from([k.split(".")[0] for k in keys] + ["x"]),
                               st.one_of(st.dictionaries(
                                   st.sampled_from([k.split(".")[-1] for k in keys]),
                                   scalars, max_size=3), scalars), max_size=3)
    yaml_file = st.one_of(sections.map(lambda d: __import__("yaml").safe_dump(d)),
                          st.text(max_size=200))
    return st.lists(override, max_size=4), st.one_of(st.none(), yaml_file)


def test_random_configs_end_in_a_plan_or_one_sentence_never_a_traceback(tmp_path, capsys):
    """Property: `conadv-train --dry-run` on random overrides and config files exits 0, or 2
    with one error line; any other exception fails the test (hypothesis shrinks it)."""
    from hypothesis import HealthCheck, given, settings

    from conadv.cli.train import main

    overrides, files = _config_surface()
    seen = {"cases": 0}

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(overrides, files)
    def check(args, yaml_text):
        seen["cases"] += 1
        argv = ["--dry-run", *[a for a in args if not a.startswith("-")]]
        if yaml_text is not None:
            path = tmp_path / "random.yaml"
            path.write_text(yaml_text, encoding="utf-8", errors="surrogatepass")
            argv += ["--config", str(path)]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(argv)
        err = capsys.readouterr().err
        assert exited.value.code in (0, 2), err
        if exited.value.code == 2:
            assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
            assert "Traceback" not in err, err

    started = time.perf_counter()
    check()
    print(f"{seen['cases']} random configurations in {time.perf_counter() - started:.1f} s")
    assert seen["cases"] >= 150  # the fuzzer's config doors run more (tests/fuzz.py)
