"""A run directory belongs to one run.

On shared clusters run directories get copied, pointed at by mistake and requeued into while
another job still writes them. Rank 0 claims `log.run_dir` before anything is written there:

- **Usable**: it is (or can be made) a writable directory; otherwise one sentence.
- **Locked**: `LOCK` is created exclusively (O_EXCL, which shared filesystems honour) with the
  holder's host, pid, process start time and job identity, and held with flock where the
  filesystem supports it. A second run finds it and stops, naming the holder. A lock is taken
  over only when its holder is provably gone: the same host and a pid that is not running (or
  runs another program), the same process (an earlier run in it that did not end cleanly),
  an earlier attempt of the same Slurm job (a requeue; job ids are unique), or an earlier
  restart of the same torchrun agent (an elastic restart: the same Slurm job attempt and
  rendezvous id, a rendezvous id chosen for the job, or outside Slurm the same agent process:
  torchrun's default run ids are shared by unrelated jobs, "none" for static ranks, a fixed
  default in launch/torchrun.sh). Anything else needs the user to say so by deleting the
  file. Of two runs that take over one stale lock at once, exactly one wins: each moves the
  stale file aside (one rename succeeds) and creates a new one exclusively (a third starting
  in the same instant could slip through the moment a lock moved by mistake is put back).
- **One identity**: `run.json` holds the run's id; checkpoints (in their manifest) and every
  metrics record carry it. A fresh start in a directory that holds another run's checkpoints
  or metrics stops with one sentence, unless the user asks to replace it
  (`checkpoint.resume=none log.overwrite=true`); `resume=auto` finding only damaged
  checkpoints stops instead of starting over; a resume continues the identity of the
  checkpoint it resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conadv.checkpoints.format import list_checkpoints, run_of
from conadv.config import RunConfig, parse_saved_config, trajectory_changes
from conadv.distributed import broadcast_object
from conadv.errors import CheckpointError, ConfigError, UserError

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
RUN_FILE = "run.json"
# what a run writes at the top of its directory (checkpoints/ is judged by its contents)
RUN_FILES = (RUN_FILE, "config.yaml", "metrics.jsonl", "summary.json", "tensorboard",
             "trackers.json", "wandb", "report")


class RunDirectoryError(ConfigError):
    """The run directory cannot be used by this run (one sentence)."""


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), which tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# torchrun run ids that many jobs share: torchrun's own default, and launch/torchrun.sh's
# outside Slurm; any other (a --rdzv-id the user chose per job) identifies one job
_SHARED_TORCHRUN_IDS = ("none", "default", "conadv")


def _job_identity() -> dict[str, Any]:
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    agent = os.getppid()
    return {"slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "torchrun_job": os.environ.get("TORCHELASTIC_RUN_ID"),
            "torchrun_restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            # the torchrun agent that started this worker, which survives its restarts
            "agent": (f"{socket.gethostname()}:{agent}:{_process_start(agent)}"
                      if under_torchrun else None)}


@dataclass
class Holder:
    host: str
    pid: int
    start: str | None
    since: float
    job: dict[str, Any]

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), time.time(),
                   _job_identity())

    def gone_for(self, me: Holder) -> str | None:
        """Why this holder has provably ended, as seen from `me`; None if it may be running."""
        if self.host == me.host:
            if self.pid == me.pid and self.start == me.start:
                return "an earlier run in this process"
            if _process_start(self.pid) is None:
                return f"process {self.pid} is not running"
            if self.start is not None and _process_start(self.pid) != self.start:
                return f"pid {self.pid} now belongs to another program"
        theirs, mine = self.job, me.job
        same_slurm_job = bool(theirs.get("slurm_job")) and theirs.get("slurm_job") == mine.get(
            "slurm_job")
        if same_slurm_job and (theirs.get("slurm_restart") or 0) < (mine.get("slurm_restart")
                                                                     or 0):
            return f"it was an earlier attempt of Slurm job {theirs['slurm_job']}"
        unique_run_id = theirs.get("torchrun_job") not in (None, *_SHARED_TORCHRUN_IDS)
        same_attempt = (theirs.get("slurm_restart") == mine.get("slurm_restart")
                        and theirs.get("torchrun_job") == mine.get("torchrun_job")
                        and (same_slurm_job or unique_run_id or (
                            not theirs.get("slurm_job") and theirs.get("agent") is not None
                            and theirs.get("agent") == mine.get("agent"))))
        if same_attempt and (theirs.get("torchrun_restart") or 0) < (
                mine.get("torchrun_restart") or 0):
            return "it was an earlier restart of this torchrun job"
        return None

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host}, since {started}"


class RunLock:
    """The exclusive claim of a run directory (see the module doc)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self.me = Holder.me()
        self._fd: int | None = None

    def acquire(self) -> None:
        record = json.dumps(self.me.__dict__).encode()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = self._take_over(record)
        else:
            os.write(fd, record)
            os.fsync(fd)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryError(f"log.run_dir {self.path.parent} is in use by another run "
                                    f"(its lock {self.path} is held); wait for it to end or use "
                                    "another log.run_dir") from None
        except (ImportError, OSError):  # no flock here (some network filesystems): O_EXCL only
            pass
        self._fd = fd

    def _take_over(self, record: bytes) -> int:
        try:
            stale = self.path.read_bytes()
            holder = Holder(**{"job": {}, **json.loads(stale)})
        except (OSError, ValueError, TypeError):
            raise RunDirectoryError(
                f"log.run_dir {self.path.parent} has a lock file {self.path} that cannot be "
                "read; if no run uses that directory, delete the file and start again") from None
        why = holder.gone_for(self.me)
        if why is None:
            raise RunDirectoryError(
                f"log.run_dir {self.path.parent} is in use by another run ({holder.describe()});"
                f" wait for it to end or use another log.run_dir, or delete {self.path} if "
                "that run is gone (e.g. its node died)")
        log.warning("taking over the lock of %s: %s", self.path.parent, why)
        claimed = RunDirectoryError(f"log.run_dir {self.path.parent} was claimed by another run "
                                    "starting at the same time; use another log.run_dir")
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)  # of the runs that judged it stale, one moves it
        except FileNotFoundError:
            raise claimed from None
        if aside.read_bytes() != stale:  # moved a lock another run has just taken: put it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            raise claimed
        aside.unlink()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise claimed from None
        os.write(fd, record)
        os.fsync(fd)
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # unlink it only while it is still ours
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        os.close(self._fd)
        self._fd = None


def held_here(directory: Path) -> bool:
    """Whether this process holds the run directory's lock (read from the lock file: a
    start-up cut short may not have kept the RunLock object)."""
    try:
        holder = json.loads((directory / LOCK_FILE).read_bytes())
    except (OSError, ValueError):
        return False
    me = Holder.me()
    return isinstance(holder, dict) and (holder.get("host"), holder.get("pid"),
                                         holder.get("start")) == (me.host, me.pid, me.start)


def ensure_usable(directory: Path) -> None:
    """`directory` exists (made if missing) and this process can write in it, or one
    sentence says why not."""
    problem = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        problem = "it is a file, not a directory"
    except OSError as err:
        problem = err.strerror or str(err)
    if problem:
        raise RunDirectoryError(f"log.run_dir {directory} cannot be used: {problem}; choose a "
                                "writable directory")


def read_run_id(directory: Path) -> str | None:
    try:
        value = json.loads((directory / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def write_run_file(directory: Path, run_id: str) -> None:
    tmp = directory / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "created": round(time.time(), 3),
                               "host": socket.gethostname()}) + "\n")
    os.replace(tmp, directory / RUN_FILE)


def prior_run_files(directory: Path) -> list[str]:
    """What an earlier run left at the top of `directory` (not checkpoints)."""
    return [name for name in RUN_FILES if (directory / name).exists()]


def remove_prior_run(directory: Path) -> None:
    """log.overwrite=true: the earlier run's files go, so nothing of it mixes with this one.
    Only a conadv run's (a directory with run.json), and only the entries a run writes; a
    symbolic link among them stops it before anything is removed (its target is not the
    run's to delete, and a half-removed run is worse than either), but for a linked
    checkpoints/ folder, whose link stays and of which only the run's checkpoints go."""
    entries = [directory / name for name in (*RUN_FILES, "STOP", "checkpoints")]
    present = [path.name for path in entries if path.exists() or path.is_symlink()]
    if not (directory / RUN_FILE).is_file() or (directory / RUN_FILE).is_symlink():
        raise RunDirectoryError(
            f"log.run_dir {directory} holds {', '.join(present)} but no {RUN_FILE}: it is not "
            "a conadv run, and log.overwrite=true replaces only conadv runs; choose another "
            "log.run_dir")
    checkpoints = directory / "checkpoints"
    linked = [path for path in entries if path.is_symlink() and path != checkpoints]
    if linked:
        raise RunDirectoryError(
            f"log.run_dir {directory} was not replaced: {linked[0]} is a symbolic link, and "
            "conadv does not delete what a link points to; remove the link yourself or choose "
            "another log.run_dir")
    if checkpoints.is_symlink():
        # checkpoints are often put on another file system through a link: it stays, and
        # inside it go only the earlier run's checkpoints (by their manifests' run id). Any
        # other checkpoint there would be resumed by this run later (resume=auto): refused.
        foreign = [step for step in list_checkpoints(checkpoints)
                   if step.is_symlink() or run_of(step) != read_run_id(directory)]
        if foreign:
            raise RunDirectoryError(
                f"log.run_dir {directory} was not replaced: {checkpoints} links to a folder "
                f"that also holds {foreign[0].name}, not this run's, which the new run would "
                "resume later; give the new run a checkpoint folder of its own")
        entries.remove(checkpoints)
        for step in list_checkpoints(checkpoints):
            shutil.rmtree(step)
    for path in [*entries[1:], entries[0]]:  # run.json last: a removal that fails midway
        if path.is_dir():                     # leaves a run that overwrite can still replace
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log.warning("log.overwrite=true: removed the earlier run's files from %s", directory)


def drop_records_after(metrics: Path, step: int) -> None:
    """A resume from `step`: metrics records of later steps were logged by a run that went on
    past its last checkpoint; the resumed run logs those steps again, so they are dropped
    (the file is rewritten in place, atomically) rather than duplicated."""
    if not metrics.exists():
        return
    kept, dropped = [], 0
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            later = isinstance(record, dict) and int(record.get("step", 0)) > step
        except (ValueError, TypeError):
            later = False  # a torn last line: dropped below as unparsable
            dropped += 1
            continue
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = metrics.with_name(metrics.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)
        log.info("dropped %d metrics records after step %d (logged again by this run)",
                 dropped, step)


@dataclass
class Claim:
    """What rank 0 decided about the run directory (sent to every rank)."""

    run_id: str
    resume_path: str | None


def claim(directory: Path, checkpoints, resume: str, overwrite: bool,
          same_run: Any) -> tuple[RunLock, Claim]:
    """Rank 0, before anything is written to `directory`: check it, lock it, and decide which
    run this is and where it resumes (see the module doc). `checkpoints` is the directory's
    CheckpointManager; `same_run(config_text)` tells whether a saved config.yaml describes
    this run's trajectory (an earlier attempt that never wrote a checkpoint). The lock is
    released if the claim fails."""
    ensure_usable(directory)
    lock = RunLock(directory)
    lock.acquire()
    try:
        return lock, _decide(directory, checkpoints, resume, overwrite, same_run)
    except BaseException:
        lock.release()
        raise


def _decide(directory: Path, checkpoints, resume: str, overwrite: bool, same_run) -> Claim:
    prior_id = read_run_id(directory)
    prior = prior_run_files(directory)
    saved = list_checkpoints(checkpoints.directory)
    held = ", ".join(prior + ([f"{len(saved)} checkpoint(s)"] if saved else []))
    if resume == "none":
        if held and not overwrite:
            raise RunDirectoryError(
                f"log.run_dir {directory} holds another run ({held}); use a new log.run_dir, "
                "continue it with checkpoint.resume=auto, or replace it on purpose with "
                "checkpoint.resume=none log.overwrite=true")
        if held:
            remove_prior_run(directory)
        return _begin(directory, new_run_id(), None)
    path = checkpoints.choose_resume(resume)
    if path is not None:
        theirs = run_of(path)
        inside = Path(path).resolve().parent == checkpoints.directory.resolve()
        if prior_id and theirs and theirs != prior_id and not inside:
            raise RunDirectoryError(
                f"checkpoint {path} belongs to another run than the one in log.run_dir "
                f"{directory}; resume it in a new log.run_dir")
        return _begin(directory, theirs or prior_id or new_run_id(), str(path))
    if prior and overwrite:
        remove_prior_run(directory)
    elif prior:  # nothing to resume, but a run was here: this one started over, or another
        config = directory / "config.yaml"
        if not (config.exists() and same_run(config.read_text(errors="replace"))):
            raise RunDirectoryError(
                f"log.run_dir {directory} holds another run without a checkpoint ({held}); "
                "use a new log.run_dir, or replace it on purpose with checkpoint.resume=none "
                "log.overwrite=true")
        log.info("%s holds an earlier attempt of this run that wrote no checkpoint; it starts "
                 "over", directory)
        for name in ("metrics.jsonl", "summary.json"):
            (directory / name).unlink(missing_ok=True)
    return _begin(directory, prior_id or new_run_id(), None)


def _begin(directory: Path, run_id: str, resume_path: str | None) -> Claim:
    write_run_file(directory, run_id)
    return Claim(run_id, resume_path)


def claim_on_rank_zero(is_main: bool, directory: Path, checkpoints,
                       cfg: RunConfig) -> tuple[RunLock | None, str, Path | None]:
    """Every rank calls it: rank 0 claims `directory` (`claim`), the others learn the run id
    and the checkpoint to resume, or raise the same one sentence. Returns rank 0's lock."""
    lock, outcome = None, None
    if is_main:
        try:
            lock, claimed = claim(directory, checkpoints, cfg.checkpoint.resume,
                                  cfg.log.overwrite, lambda text: _same_run(text, cfg))
            outcome = (claimed.run_id, claimed.resume_path, None)
        except UserError as err:
            outcome = (None, None, (type(err).__name__, str(err)))
    run_id, resume_path, error = broadcast_object(outcome)
    if error:
        kinds = {kind.__name__: kind for kind in (CheckpointError, RunDirectoryError)}
        raise kinds.get(error[0], ConfigError)(error[1])
    return lock, run_id, Path(resume_path) if resume_path else None


def _same_run(saved_config: str, cfg: RunConfig) -> bool:
    """Whether a saved config.yaml describes this run's trajectory."""
    try:
        return not trajectory_changes(parse_saved_config(saved_config), cfg)
    except Exception:  # noqa: BLE001 (not YAML, another schema: another run)
        return False
