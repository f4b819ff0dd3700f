"""conadv-launch [torchrun options] -m conadv.cli.train [conadv-train arguments]

torchrun, with what a cluster's signals need (launch/torchrun.sh uses it):
- SIGTERM acts once: the agent begins its graceful shutdown at the first one and ignores the
  repeats (Slurm signals every process of a job step, srun forwards the one it gets, a time
  limit repeats it) instead of abandoning the shutdown half-way, which would leave the workers
  killed mid-checkpoint;
- SIGUSR1 (Slurm's warning, sent to every process unless --signal has B:) no longer kills the
  agent, whose default action it is; the workers act on it;
- a worker that exits 75 has stopped on an agreed request after the stop checkpoint was on
  disk (every rank waits for it before exiting), so the group is not restarted under
  --max-restarts even when this node's agent was not signalled (the request reached another
  node, or only the workers): restarting would train on through a preemption;
- when a worker of this node stopped that way, the launcher exits 75 too, not torchrun's 1 for
  "a worker failed".
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from conadv.cli.common import STATUS_DIR_VARIABLE
from conadv.train.preemption import TERMINATED_EXIT_STATUS


def _sigterm_once(handler):
    """torchrun's termination handler, run for the first SIGTERM only (and for every other
    signal it handles)."""
    seen = {"sigterm": False}

    def on_signal(signum, frame):
        if signum == signal.SIGTERM:
            if seen["sigterm"]:
                return  # the same request: the shutdown it began goes on
            seen["sigterm"] = True
        handler(signum, frame)

    return on_signal


def _no_restart_after_a_clean_stop(monitor):
    """The agent's worker monitor, with restarts used up once a worker exited 75."""

    def monitor_workers(agent, worker_group):
        result = monitor(agent, worker_group)
        if any(failure.exitcode == TERMINATED_EXIT_STATUS
               for failure in getattr(result, "failures", {}).values()):
            agent._remaining_restarts = 0  # the agent stops its group and reports it
        return result

    return monitor_workers


def _stopped_cleanly(status_dir: Path) -> bool:
    """A worker of this node exited 75: the agreed stop checkpoint is on disk. (A restart
    never follows a 75, so no file here is left from an earlier group that stopped.)"""
    return any(path.read_text().strip() == str(TERMINATED_EXIT_STATUS)
               for path in status_dir.glob("local-rank-*"))


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import api as elastic

    argv = sys.argv[1:] if argv is None else argv
    status_dir = Path(tempfile.mkdtemp(prefix="conadv-launch-"))
    os.environ[STATUS_DIR_VARIABLE] = str(status_dir)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # torchrun installs this module-level handler when it starts its workers
    elastic._terminate_process_handler = _sigterm_once(elastic._terminate_process_handler)
    LocalElasticAgent._monitor_workers = _no_restart_after_a_clean_stop(
        LocalElasticAgent._monitor_workers)
    try:
        torchrun.main(argv)
    except (Exception, elastic.SignalException):
        if _stopped_cleanly(status_dir):
            print("conadv-launch: every worker stopped with a checkpoint; exit 75 (resume "
                  "with checkpoint.resume=auto)", file=sys.stderr)
            sys.exit(TERMINATED_EXIT_STATUS)
        raise
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
