"""launch/slurm.sbatch's decision once the run has ended, without a cluster: stand-ins for
srun, scontrol and sleep on PATH. A stop on a signal is requeued, also through a controller
that is busy or does not answer; a cancel and a deliberate stop (train.stop_at_step) are not.
(tests/test_launch.py runs the script on a one-node Slurm cluster.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

from conadv.train.preemption import REASONS, TERMINATED, TERMINATED_EXIT_STATUS
from tests.helpers import REPO, TINY, subprocess_env

JOB = "4242"

STANDINS = {
    # the job step: the summary the test wrote (then a signal to the batch shell, as Slurm
    # sends on a cancel, and the ranks' exit status), or else the command itself
    "srun": """
if [ -n "${STANDIN_SUMMARY:-}" ]; then
  cp "$STANDIN_SUMMARY" "$RUN_DIR/summary.json"
  if [ -n "${STANDIN_SIGNAL_BATCH:-}" ]; then kill -s "$STANDIN_SIGNAL_BATCH" "$PPID"; fi
  exit "${STANDIN_EXIT:-0}"
fi
while [[ $1 == --* ]]; do shift; done
exec "$@"
""",
    # a controller that fails `show job` STANDIN_SHOW_JOB_FAILURES times, then answers
    "scontrol": """
case "$1 ${2:-}" in
  "show hostnames") echo node1 ;;
  "show job")
    if [ "$(grep -c '^scontrol show job' "$STANDIN_LOG")" -le "${STANDIN_SHOW_JOB_FAILURES:-0}" ]
    then
      echo "slurm_load_jobs error: Socket timed out on send/recv operation" >&2
      exit 1
    fi
    echo "JobId=$2 JobName=conadv"
    echo "   JobState=${STANDIN_JOB_STATE:-RUNNING} Reason=None Dependency=(null)" ;;
esac
""",
    "sleep": "",  # the back-off, logged, not waited
}


def run_script(tmp_path: Path, summary: dict | None, *train_args: str,
               **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The script as sbatch runs it (tasks mode), and the stand-ins' calls in order."""
    bin_dir, run_dir, calls = tmp_path / "bin", tmp_path / "run", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, body in STANDINS.items():
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "$STANDIN_LOG"\n'
                                    + body)
        (bin_dir / name).chmod(0o755)
    calls.touch()
    if summary is not None:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        env["STANDIN_SUMMARY"] = str(tmp_path / "summary.json")
    environment = {key: value for key, value in subprocess_env().items()
                   if not key.startswith("SLURM_")}
    environment.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RUN_DIR=str(run_dir),
                       SLURM_JOB_ID=JOB, SLURM_JOB_NODELIST="node1", CONADV_LAUNCH="tasks",
                       PYTHON=sys.executable, STANDIN_LOG=str(calls), **env)
    result = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), *train_args], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=300)
    return result, [line for line in calls.read_text().splitlines()
                    if not line.startswith("scontrol show hostnames")]


def stopped(reason: str, terminated: bool, planned: bool = False) -> dict:
    """The summary of this attempt's rank 0 after a stop with a checkpoint."""
    return {"slurm_attempt": f"{JOB}.0", "finished": False, "stop_reason": reason,
            "terminated": terminated, "planned_stop": planned}


ON_SIGTERM = stopped(REASONS[TERMINATED], terminated=True)
SIGTERM_EXIT = {"STANDIN_EXIT": str(TERMINATED_EXIT_STATUS)}


def test_a_stop_on_sigterm_is_requeued(tmp_path):
    result, calls = run_script(tmp_path, ON_SIGTERM, **SIGTERM_EXIT)
    assert result.returncode == 0, result.stderr
    assert calls[0].startswith("srun ")
    assert calls[1:] == [f"scontrol show job {JOB}", f"scontrol requeue {JOB}"]
    assert "stopped with a checkpoint (srun exit 75, job RUNNING); requeueing" in result.stdout


def test_a_busy_controller_is_asked_again_and_the_job_requeued(tmp_path):
    result, calls = run_script(tmp_path, ON_SIGTERM, STANDIN_SHOW_JOB_FAILURES="2",
                               **SIGTERM_EXIT)
    assert result.returncode == 0, result.stderr
    assert calls[1:] == [f"scontrol show job {JOB}", "sleep 2", f"scontrol show job {JOB}",
                         "sleep 4", f"scontrol show job {JOB}", f"scontrol requeue {JOB}"]
    assert "job RUNNING); requeueing" in result.stdout


def test_a_controller_that_never_answers_still_requeues_a_job_nobody_cancelled(tmp_path):
    """No SIGTERM reached the batch shell, as a cancel would send: requeued anyway."""
    result, calls = run_script(tmp_path, ON_SIGTERM, STANDIN_SHOW_JOB_FAILURES="99",
                               **SIGTERM_EXIT)
    assert result.returncode == 0, result.stderr
    assert calls.count(f"scontrol show job {JOB}") == 3 and calls[-1] == f"scontrol requeue {JOB}"
    sentences = [line for line in result.stderr.splitlines() if line.startswith("conadv:")]
    assert len(sentences) == 1 and "requeueing anyway" in sentences[0]


def test_a_controller_that_never_answers_after_a_sigterm_to_the_batch_shell_does_not_requeue(
        tmp_path):
    """A SIGTERM to the batch shell too, as a scancel sends: maybe a cancel, left stopped."""
    result, calls = run_script(tmp_path, ON_SIGTERM, STANDIN_SHOW_JOB_FAILURES="99",
                               STANDIN_SIGNAL_BATCH="TERM", **SIGTERM_EXIT)
    assert result.returncode == 0, result.stderr
    assert calls.count(f"scontrol show job {JOB}") == 3
    assert not any(call.startswith("scontrol requeue") for call in calls)
    sentences = [line for line in result.stderr.splitlines() if line.startswith("conadv:")]
    assert len(sentences) == 1 and "not requeued" in sentences[0]


def test_a_cancelled_job_is_not_requeued(tmp_path):
    """While the batch script runs, `scancel` shows the job COMPLETING (seen on Slurm 22.05)."""
    for state in ("COMPLETING", "CANCELLED"):
        (tmp_path / state).mkdir()
        result, calls = run_script(tmp_path / state, ON_SIGTERM, STANDIN_JOB_STATE=state,
                                   STANDIN_SIGNAL_BATCH="TERM", **SIGTERM_EXIT)
        assert result.returncode == 0, result.stderr
        assert not any(call.startswith("scontrol requeue") for call in calls), state
        assert f"Slurm is ending the job ({state})" in result.stdout


def test_a_stop_at_step_ends_the_job_without_requeue(tmp_path):
    result, calls = run_script(tmp_path, stopped("train.stop_at_step reached", False, True))
    assert result.returncode == 0, result.stderr
    assert not any(call.startswith("scontrol") for call in calls)
    assert "stopped at train.stop_at_step with a checkpoint, as asked; not requeued" in (
        result.stdout)


def test_the_trainers_stop_at_step_is_recognised(tmp_path):
    """The real trainer under the script (srun runs the command): its summary after a stop at
    train.stop_at_step reads as a deliberate end."""
    result, calls = run_script(tmp_path, None, *TINY, "train.max_steps=4",
                               "train.stop_at_step=2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and not summary["finished"], summary
    assert not any(call.startswith("scontrol") for call in calls), calls
    assert "as asked; not requeued" in result.stdout, result.stdout[-3000:]
