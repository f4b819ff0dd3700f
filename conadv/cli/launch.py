"""conadv-launch [torchrun options] -m conadv.cli.train [conadv-train arguments]

torchrun, with what a cluster's signals need (launch/torchrun.sh uses it):
- a termination signal that arrives twice (Slurm signals every process of a job step, and srun
  forwards the one it gets) is one request: the agent begins its graceful shutdown once
  instead of abandoning it half-way, which would leave the workers killed mid-checkpoint;
- SIGUSR1 (Slurm's warning, sent to every process unless --signal has B:) no longer kills the
  agent, whose default action it is; the workers act on it;
- when every worker of this node stopped cleanly on a stop request (exit 75 after writing its
  checkpoint), the launcher exits 75 too, not torchrun's 1 for "a worker failed".
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from conadv.cli.common import STATUS_DIR_VARIABLE
from conadv.train.preemption import REPEAT_WINDOW_S, TERMINATED_EXIT_STATUS


def _handled_once(handler):
    """torchrun's termination handler, run for the first SIGTERM of a burst only."""
    first = {"at": None}

    def on_signal(signum, frame):
        now = time.monotonic()
        if signum == signal.SIGTERM and first["at"] is not None:
            if now - first["at"] < REPEAT_WINDOW_S:
                return  # the same request: the shutdown it began goes on
        first["at"] = now
        handler(signum, frame)

    return on_signal


def _stopped_cleanly(status_dir: Path, argv: list[str]) -> bool:
    from torch.distributed.run import determine_local_world_size, parse_args

    local_workers = determine_local_world_size(parse_args(argv).nproc_per_node)
    codes = []
    for local_rank in range(local_workers):
        path = status_dir / f"local-rank-{local_rank}"
        codes.append(path.read_text().strip() if path.exists() else "none")
    return all(code == str(TERMINATED_EXIT_STATUS) for code in codes)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api as elastic

    argv = sys.argv[1:] if argv is None else argv
    status_dir = Path(tempfile.mkdtemp(prefix="conadv-launch-"))
    os.environ[STATUS_DIR_VARIABLE] = str(status_dir)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # torchrun installs this module-level handler when it starts its workers
    elastic._terminate_process_handler = _handled_once(elastic._terminate_process_handler)
    try:
        torchrun.main(argv)
    except (Exception, elastic.SignalException):
        if _stopped_cleanly(status_dir, argv):
            print("conadv-launch: every worker stopped with a checkpoint; exit 75 (resume "
                  "with checkpoint.resume=auto)", file=sys.stderr)
            sys.exit(TERMINATED_EXIT_STATUS)
        raise
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
