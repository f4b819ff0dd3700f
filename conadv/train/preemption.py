"""Stop requests: checkpoint and exit cleanly before a time limit or preemption.

A request is SIGUSR1 to a training process, or a file named STOP in the run directory (what
launch/slurm.sbatch creates when Slurm sends its warning signal; it works through torchrun and
across nodes on a shared filesystem). Ranks agree at logging steps with one tiny all-reduce, so
every rank stops after the same step and writes the same checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch

from conadv.distributed import all_reduce_sum

log = logging.getLogger(__name__)

STOP_FILE = "STOP"


class StopRequest:
    def __init__(self, run_dir: Path, is_main: bool) -> None:
        self.path = Path(run_dir) / STOP_FILE
        self.signalled = False
        if is_main and self.path.exists():
            # Launchers remove it before starting; one left by hand stops this run too.
            log.warning("%s exists: the run will checkpoint and stop at its first logging step "
                        "(delete the file to let it run)", self.path)
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def requested_here(self) -> bool:
        return self.signalled or self.path.exists()

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank saw a request (a collective)."""
        flag = torch.tensor(float(self.requested_here()), device=device)
        return bool(all_reduce_sum(flag).item() > 0)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None
