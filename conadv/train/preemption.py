"""Stop requests: checkpoint and exit cleanly before a time limit, a preemption or a kill.

A request is a termination signal (SIGTERM, which Slurm, Kubernetes and most schedulers send
before killing; SIGINT on an interactive run), SIGUSR1 (Slurm's warning before the time limit),
or a file named STOP in the run directory (what launch/slurm.sbatch creates when warned; it
works through torchrun and across nodes on a shared filesystem; rank 0 looks for it at most
once a second).

Schedulers signal every process of a job, torchrun passes the signal it gets on to its workers
as well, and Slurm repeats SIGTERM at the time limit after a --signal=TERM@<s> warning: a
repeated SIGTERM is always the same request (the scheduler's SIGKILL ends the process if the
checkpoint does not fit its grace period). Only an interactive user escalates: a second SIGINT
(Ctrl-C) more than `REPEAT_WINDOW_S` after the first ends the process at once (a terminal
delivers the first one to torchrun and to the workers within moments).

A termination signal during start-up is a request too, acted on after the first step (the
ranks agree on it there; joining the process group and resuming take minutes on a thousand
ranks). But start-up may not reach a first step (a huge or slow file system, a stuck folder
walk): if it has not `STARTUP_GRACE_S` after the signal, the process ends on its own with exit
75, rank 0 first writing a summary that says so (where it holds the run directory), so that
launch/slurm.sbatch requeues the job. Before the first step there is nothing to save; the
grace is shorter than Slurm's KillWait and torchrun's 30 s, whose SIGKILL would leave no
summary. The process ends from a timer thread (os._exit), not by an exception raised in the
middle of start-up: half a claim, half a lock file or half an overwrite cannot happen, and no
rank waits in a collective for one that left.

A STOP file is removed by rank 0 once the run has stopped on it with a checkpoint, so that the
resumed run does not stop again.

The ranks agree after every optimizer step, without a host synchronisation: each rank's level
is all-reduced (max) without blocking, and the result is read one step later, through a pinned
host copy and an event on a GPU. So every rank stops after the same step, about one step after
the request; a single process needs no agreement and acts after the step it saw the request in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from conadv.distributed import all_reduce_max_async
from conadv.streams import streams_for

log = logging.getLogger(__name__)

STOP_FILE = "STOP"
# how a run that stopped on a termination signal exits: "not finished, resume me" (EX_TEMPFAIL)
TERMINATED_EXIT_STATUS = 75
# a second SIGINT this soon after the first is the same Ctrl-C, delivered twice
REPEAT_WINDOW_S = 3.0
_FILE_CHECK_INTERVAL_S = 1.0

_NONE, _WARNED, TERMINATED = 0, 1, 2
REASONS = {_WARNED: "stop requested (SIGUSR1 or a STOP file in the run directory)",
           TERMINATED: "terminated by a signal (SIGTERM or SIGINT)"}


def _present(path: Path) -> bool:
    """Whether the STOP file is there; an unusable run directory (checked, with its one
    sentence, when the run claims it) has none."""
    try:
        return path.exists()
    except OSError:
        return False


def slurm_attempt() -> str | None:
    """'<job id>.<restart count>' inside a Slurm job, else None: written in the run summary,
    so that launch/slurm.sbatch decides to requeue from what this attempt's rank 0 wrote
    rather than from srun's exit status (with several tasks, srun reports the first exit 75
    as a failure and kills the other tasks)."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


# how long start-up may go on after a termination signal before the process ends on its own
STARTUP_GRACE_S = 20.0
STARTUP_REASON = "terminated by a signal during start-up, before the first step"


class StopRequest:
    def __init__(self, run_dir: Path, is_main: bool, device: torch.device,
                 distributed: bool,
                 record_startup_stop: Callable[[str], None] | None = None) -> None:
        """`record_startup_stop(reason)`: writes what a scheduler reads when start-up is ended
        by the grace timer (called from the timer's thread, just before the process ends)."""
        self.path = Path(run_dir) / STOP_FILE
        self.is_main = is_main
        self.level = _NONE
        self.requested_at: float | None = None  # time.monotonic() of the first signal
        self._terminated_at = 0.0
        self.started = False  # the first step has begun (the grace timer stands down)
        self._record_startup_stop = record_startup_stop
        self._grace: threading.Timer | None = None
        self._file_checked_at = -_FILE_CHECK_INTERVAL_S
        if is_main and _present(self.path):
            # Launchers remove it before starting; one left by hand stops this run too.
            log.warning("%s exists: the run will checkpoint and stop after its first step "
                        "(delete the file to let it run)", self.path)
        self._agreement = _Agreement(device) if distributed else None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            wanted = [signal.SIGUSR1, signal.SIGTERM]
            # SIGINT: Ctrl-C, `kill -INT`, an IDE's stop button (no terminal needed); left
            # alone where it is ignored (a job started in the background with `&`)
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                wanted.append(signal.SIGINT)
            for signum in wanted:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
        if signum == signal.SIGUSR1:
            self.level = max(self.level, _WARNED)
            return
        now = time.monotonic()
        if self.level == TERMINATED:
            if signum == signal.SIGTERM or now - self._terminated_at < REPEAT_WINDOW_S:
                return  # the same request, from the scheduler, the launcher or the terminal
            self.close(wait=False)  # a second Ctrl-C: end now, as the signal would
            os.kill(os.getpid(), signum)
            return
        self.level = TERMINATED
        self._terminated_at = now
        if not self.started and self._grace is None:
            self._grace = threading.Timer(STARTUP_GRACE_S, self._end_startup)
            self._grace.daemon = True
            self._grace.start()
        log.warning("%s received: finishing this step, writing a checkpoint, then stopping%s",
                    signal.Signals(signum).name,
                    " (press Ctrl-C again to end at once)" if signum == signal.SIGINT else "")

    def begin(self) -> None:
        """The training loop starts: the request is acted on after this step."""
        self.started = True
        if self._grace is not None:
            self._grace.cancel()

    def _end_startup(self) -> None:
        """The grace timer: start-up did not reach a first step in time. Nothing is lost (the
        state is the checkpoint the run started from); the process ends with exit 75."""
        if self.started:
            return
        log.warning("start-up did not reach the first step within %.0f s of the stop signal; "
                    "ending now (nothing to save yet), exit %d", STARTUP_GRACE_S,
                    TERMINATED_EXIT_STATUS)
        try:
            if self._record_startup_stop is not None:
                self._record_startup_stop(STARTUP_REASON)
        finally:
            logging.shutdown()  # flush what was said
            os._exit(TERMINATED_EXIT_STATUS)

    def requested_here(self) -> int:
        """This rank's level: its signals, and on rank 0 the STOP file."""
        if self.level == _NONE and self.is_main:
            now = time.monotonic()
            if now - self._file_checked_at >= _FILE_CHECK_INTERVAL_S:
                self._file_checked_at = now
                if _present(self.path):
                    self.level = _WARNED
        return self.level

    def stopped(self) -> None:
        """The run has stopped on the request, its checkpoint on disk: a STOP file has done
        its job (rank 0 removes it, so that the resumed run does not stop again)."""
        if self.is_main:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)

    def poll(self) -> int:
        """Call after every optimizer step on every rank: the level the ranks agreed on, 0 to
        go on, else a key of REASONS. Never synchronises the host with the device."""
        level = self.requested_here()
        if self._agreement is None:
            return level
        return self._agreement.exchange(level)

    def close(self, wait: bool = True) -> None:
        """Restore the signal handlers; `wait` for the last exchange (every rank posted it)."""
        if self._agreement is not None:
            self._agreement.finish(wait)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class _Agreement:
    """A max over ranks of one small integer per step, read one step after it was posted."""

    def __init__(self, device: torch.device) -> None:
        self.streams = streams_for(device)
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        host = torch.zeros(1, dtype=torch.int32)
        self.host = self.streams.pin(host) if self.streams is not None else host
        self.work: Any = None
        self.ready: Any = None

    def exchange(self, level: int) -> int:
        """Post `level`; return the max the ranks posted at the previous call (0 at first)."""
        agreed = self._collect()
        self.flag.fill_(level)
        self.work = all_reduce_max_async(self.flag)
        if self.streams is not None:  # a GPU: the stream waits, the host does not
            self.work.wait()
            self.host.copy_(self.flag, non_blocking=True)
            self.ready = self.streams.new_event()
            self.ready.record(self.streams.current())
        return agreed

    def _collect(self) -> int:
        if self.work is None:
            return _NONE
        if self.streams is None:
            self.work.wait()
            value = int(self.flag[0])
        else:
            self.ready.synchronize()  # recorded a step ago: the host rarely waits here
            value = int(self.host[0])
        self.work = None
        return value

    def finish(self, wait: bool) -> None:
        if wait:
            self._collect()
        self.work = None
