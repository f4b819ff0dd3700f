"""Stop requests: checkpoint and exit cleanly before a time limit, a preemption or a kill.

A request is a termination signal (SIGTERM, which Slurm, Kubernetes and most schedulers send
before killing; SIGINT on an interactive run), SIGUSR1 (Slurm's warning before the time limit),
or a file named STOP in the run directory (what launch/slurm.sbatch creates when warned; it
works through torchrun and across nodes on a shared filesystem). The current step finishes,
the ranks agree (one tiny all-reduce, at logging steps in a multi-rank job and after every step
in a single process), a checkpoint is written and the run ends. A second termination signal
ends the process at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from conadv.distributed import all_reduce_max

log = logging.getLogger(__name__)

STOP_FILE = "STOP"
# how a run that stopped on a termination signal exits: "not finished, resume me" (EX_TEMPFAIL)
TERMINATED_EXIT_STATUS = 75

_NONE, _WARNED, TERMINATED = 0, 1, 2
REASONS = {_WARNED: "stop requested (SIGUSR1 or a STOP file in the run directory)",
           TERMINATED: "terminated by a signal (SIGTERM or SIGINT)"}


class StopRequest:
    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.path = Path(run_dir) / STOP_FILE
        self.level = _NONE
        if is_main and self.path.exists():
            # Launchers remove it before starting; one left by hand stops this run too.
            log.warning("%s exists: the run will checkpoint and stop at its first logging step "
                        "(delete the file to let it run)", self.path)
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            wanted = [signal.SIGUSR1, signal.SIGTERM]
            if sys.stdin is not None and sys.stdin.isatty():
                wanted.append(signal.SIGINT)  # Ctrl-C on an interactive run
            for signum in wanted:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:
            self.level = max(self.level, _WARNED)
            return
        if self.level == TERMINATED:  # the second one: end now, as the signal would
            self.close()
            os.kill(os.getpid(), signum)
            return
        self.level = TERMINATED
        log.warning("%s received: finishing this step, writing a checkpoint, then stopping "
                    "(send it again to end at once)", signal.Signals(signum).name)

    def requested_here(self) -> int:
        if self.level == _NONE and self.path.exists():
            return _WARNED
        return self.level

    def agreed(self, device: torch.device) -> int:
        """The strongest request any rank saw (a collective): 0 none, else a key of REASONS."""
        flag = torch.tensor(float(self.requested_here()), device=device)
        return int(all_reduce_max(flag).item())

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
