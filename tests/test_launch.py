"""Launching for real: the launch scripts, multi-node torchrun with a c10d rendezvous, elastic
restarts after a killed worker, and Slurm jobs (a one-node cluster started by the test)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    TINY,
    assert_same_run_state,
    checkpoint_state,
    children_of,
    free_port,
    subprocess_env,
)

SCRIPTS = [REPO / "launch/torchrun.sh", REPO / "launch/slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run does)")
    result = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_torchrun_script_rejects_unknown_options():
    result = subprocess.run([str(REPO / "launch/torchrun.sh"), "--nprocs", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown option '--nprocs'" in result.stderr


def torchrun_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch/torchrun.sh"), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout,
                          env=subprocess_env(PYTHON=sys.executable))


RUN = [*TINY, "train.max_steps=6", "train.deterministic=false", "adv.enabled=true"]


def assert_same_parameters(a_dir: Path, b_dir: Path) -> None:
    """Two layouts of one job (2 nodes x 1 rank, 1 node x 2 ranks): the same parameters up to
    the all-reduce's summation order."""
    a, b = checkpoint_state(a_dir), checkpoint_state(b_dir)
    assert a["step"] == b["step"]
    for name, value in a["model"].items():
        if "running_" in name or "num_batches_tracked" in name:
            continue
        torch.testing.assert_close(value, b["model"][name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_node_with_two_processes(tmp_path):
    port = free_port()
    nodes = [subprocess.Popen(
        [str(REPO / "launch/torchrun.sh"), "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--",
         *RUN, f"log.run_dir={tmp_path / 'nodes'}"],
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(PYTHON=sys.executable), start_new_session=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            _kill_session(node)
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    single = torchrun_script("--nproc-per-node", "2", "--", *RUN,
                             f"log.run_dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_parameters(tmp_path / "nodes", tmp_path / "single")


def _kill_session(process: subprocess.Popen) -> None:
    """Leave no launcher or worker behind when a test fails half-way."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path):
    run = [*TINY, "train.max_steps=30", "checkpoint.every_steps=5", "checkpoint.resume=auto"]
    straight = torchrun_script("--nproc-per-node", "2", "--", *run,
                               f"log.run_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    elastic_dir = tmp_path / "elastic"
    agent = subprocess.Popen(
        [str(REPO / "launch/torchrun.sh"), "--nproc-per-node", "2", "--max-restarts", "1",
         "--", *run, f"log.run_dir={elastic_dir}"],
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(PYTHON=sys.executable), start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (elastic_dir / "checkpoints" / "step-00000010").exists():
            assert agent.poll() is None and time.time() < deadline, "never reached step 10"
            time.sleep(0.02)
        victims = children_of(agent.pid)
        assert len(victims) == 2
        os.kill(victims[1], signal.SIGKILL)
        _, err = agent.communicate(timeout=300)
    finally:
        _kill_session(agent)
    assert agent.returncode == 0, err[-3000:]
    assert "resumed from" in err  # the restarted group picked up a checkpoint
    summary = json.loads((elastic_dir / "summary.json").read_text())
    assert summary["finished"] and summary["resumed_from"] is not None
    assert_same_run_state(checkpoint_state(tmp_path / "straight"), checkpoint_state(elastic_dir))


# --------------------------------------------------------------------------- Slurm


class SlurmCluster:
    """slurmctld + slurmd (+ munged when not running) for one node, on free ports, with state
    under a temporary directory. Root only (slurmd launches jobs as their owner)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        cpus = os.cpu_count() or 2
        self.conf.write_text("\n".join([
            "ClusterName=conadvtest", f"SlurmctldHost={self.host}",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            # a requeued job waits out the credential lifetime (default 120 s) before it can run
            # again; a short lifetime keeps the preemption test quick
            "AuthType=auth/munge", "AuthInfo=cred_expire=10",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log",
            f"SlurmdLogFile={self.root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
            "ReturnToService=2", "JobRequeue=1", "MpiDefault=none", "MinJobAge=600",
            f"NodeName={self.host} CPUs={cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def start(self) -> None:
        self.write_config()
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        for daemon in (["slurmctld", "-D"], ["slurmd", "-D", "-N", self.host]):
            log = open(self.root / "log" / f"{daemon[0]}.out", "w")
            self.procs.append(subprocess.Popen(daemon, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm node never became idle (state {state!r}); see "
                           f"{self.root}/log")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def job_field(self, job: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job, check=False).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return ""

    def kill_job_processes(self) -> None:
        """SIGKILL what this cluster's jobs left running (their environment names its
        SLURM_CONF): a job that hung past its test would otherwise hold its rendezvous port
        (20000 + job id), and the next module's cluster numbers its jobs from 1 again."""
        mine = f"SLURM_CONF={self.conf}".encode()
        spared = {os.getpid()} | {proc.pid for proc in self.procs}  # the cluster stops itself
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if (int(environ.parent.name) not in spared
                        and mine in environ.read_bytes().split(b"\0")):
                    os.kill(int(environ.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass  # gone meanwhile, or not ours to read

    def wait_for(self, job: str, states: set[str], timeout: float) -> str:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.job_field(job, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job} is {state!r}, not {states}, after {timeout} s")

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        self.kill_job_processes()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm test cluster needs root")
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing); "
                    "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def submit(cluster: SlurmCluster, run_dir: Path, sbatch_args: list[str], train_args: list[str],
           **env: str) -> str:
    environment = {**subprocess_env(PYTHON=sys.executable, RUN_DIR=str(run_dir), **env),
                   "SLURM_CONF": str(cluster.conf)}
    result = subprocess.run(["sbatch", "--parsable", f"--output={run_dir}.out", *sbatch_args,
                             str(REPO / "launch/slurm.sbatch"), *train_args],
                            cwd=REPO, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


DEMO = ["--config", str(REPO / "configs/demo.yaml"), "log.progress=false",
        "log.tensorboard=false"]


@pytest.mark.slow
def test_slurm_warning_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, ["--cpus-per-task=2"],
                 [*TINY, "train.max_steps=40", "log.every_steps=2"],
                 CONADV_NPROC_PER_NODE="2")  # torchrun mode: one task starting 2 workers
    deadline = time.time() + 240
    while '"kind": "train"' not in _read(run_dir / "metrics.jsonl"):
        assert time.time() < deadline, _read(Path(f"{run_dir}.out"))[-3000:]
        time.sleep(0.2)
    # what --signal=B:USR1@300 delivers before the time limit, sent now
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    deadline = time.time() + 180
    while slurm.job_field(job, "Restarts") != "1":
        assert time.time() < deadline, _read(Path(f"{run_dir}.out"))[-3000:]
        time.sleep(0.5)
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert not stopped["finished"] and "stop requested" in stopped["stop_reason"]
    state = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    output = _read(Path(f"{run_dir}.out"))
    assert state == "COMPLETED", output[-3000:]
    assert "requeueing job" in output and "(restart 1)" in output
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["finished"]
    assert final["resumed_from"].endswith(f"step-{stopped['steps']:08d}")


@pytest.mark.slow
def test_slurm_sigterm_to_every_process_of_two_tasks_checkpoints_requeues_and_resumes_exactly(
        slurm, tmp_path):
    """`scancel --signal=TERM <job>`: SIGTERM to every process of the job step at once (both
    tasks and their DataLoader workers), as a time limit with --signal=TERM@<s> sends it. With
    two tasks srun sees the first exit 75 as a failure and kills the other task
    (--kill-on-bad-exit), so the script must decide from the run's summary, not from srun.
    Not to the batch step: srun answers a SIGTERM of its own by killing its tasks at once (see
    launch/README.md)."""
    run = [*TINY, "train.max_steps=30", "checkpoint.every_steps=1000", "log.every_steps=1",
           "data.workers=2"]
    straight = torchrun_script("--nproc-per-node", "2", "--", *run,
                               f"log.run_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "run"
    job = submit(slurm, run_dir, ["--ntasks-per-node=2"], run, CONADV_LAUNCH="tasks")
    deadline = time.time() + 240
    while _read(run_dir / "metrics.jsonl").count('"kind": "train"') < 5:
        assert time.time() < deadline, _read(Path(f"{run_dir}.out"))[-3000:]
        time.sleep(0.2)
    slurm.run("scancel", "--signal=TERM", job)
    deadline = time.time() + 180
    while slurm.job_field(job, "Restarts") != "1":
        assert time.time() < deadline, _read(Path(f"{run_dir}.out"))[-3000:]
        time.sleep(0.5)
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["terminated"] and not stopped["finished"], stopped
    assert stopped["slurm_attempt"] == f"{job}.0" and stopped["world_size"] == 2
    state = slurm.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    output = _read(Path(f"{run_dir}.out"))
    assert state == "COMPLETED", output[-3000:]
    assert "stopped with a checkpoint (srun exit" in output, output[-3000:]
    assert "exited unexpectedly" not in output
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["finished"] and final["slurm_attempt"] == f"{job}.1"
    assert final["resumed_from"].endswith(f"step-{stopped['steps']:08d}")
    assert_same_run_state(checkpoint_state(tmp_path / "straight"), checkpoint_state(run_dir))
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert any('"kind": "eval"' in r for r in records)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
