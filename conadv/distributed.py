"""Where am I running (torchrun, Slurm, a single process), process-group set-up and teardown,
and the few collective helpers the trainer needs.

A job with attack ranks (adv.attack_ranks) splits its world into trainers and attack ranks:
`process_group` then also makes the trainers' group, and every helper here (and DDP) runs over
it, so the training code is the same with or without attack ranks; the attack ranks talk to the
trainers only through conadv.adversarial.attack_ranks."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from conadv.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as found in the environment."""

    launcher: str  # "torchrun", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def trainer_env(env: DistEnv, trainers: int) -> DistEnv:
    """A trainer's view of the job: the world is the trainers (the last ranks may attack)."""
    return replace(env, world_size=trainers)


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (it wins when Slurm started torchrun); a plain
    `srun` task has SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the job's node list."""
    env = os.environ if environ is None else environ
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return DistEnv("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]),
                       int(env["LOCAL_RANK"]), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", "29500")))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", "0")),
                       env.get("MASTER_ADDR", nodes[0] if nodes else "127.0.0.1"),
                       int(env.get("MASTER_PORT", str(20000 + job_id % 20000))))
    return DistEnv("single", 0, 1, 0, "127.0.0.1", 0)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list, e.g. 'gpu[01-03,07],login1' (what
    `scontrol show hostnames` prints, without needing scontrol on the compute node)."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = match.groups()
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for number in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(number).zfill(len(lo))}{suffix}")
    return hosts


_SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS", "SLURM_GPUS_ON_NODE",
                        "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")


def gpus_given(env: DistEnv, backend: str, environ: dict[str, str] | None = None) -> str | None:
    """What says this job was given GPUs (for the error when CUDA is unusable), or None."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible.strip() and visible.strip() not in ("-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in _SLURM_GPU_VARIABLES:
        if environ.get(name, "").strip() not in ("", "0"):
            return f"{name}={environ[name]}"
    if env.launcher == "torchrun" and backend == "nccl":
        return "torchrun with dist.backend=nccl"
    return None


def cuda_unusable_reason() -> str:
    """Why torch cannot use CUDA here, in the words of torch's own initialisation."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    try:
        torch.cuda.init()
    except Exception as err:  # torch raises RuntimeError/AssertionError with the driver's words
        return str(err).strip().splitlines()[0]
    return "no CUDA device is visible"


def pick_device(requested: str, env: DistEnv, backend: str = "auto") -> torch.device:
    """CUDA when asked for or available; the CPU otherwise, but never quietly for a job that
    was given GPUs (a driver too old for the wheel makes CUDA unusable, and the job would
    train on the CPU for days)."""
    if requested == "auto" and not torch.cuda.is_available():
        evidence = gpus_given(env, backend)
        if evidence:
            raise ConfigError(
                f"this job was given GPUs ({evidence}) but CUDA is unusable "
                f"({cuda_unusable_reason()}); install a torch build whose CUDA version the "
                "driver supports (nvidia-smi shows the driver's), or set train.device=cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; "
                              "use train.device=cpu")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def attacker_of(trainer: int, trainers: int, attackers: int) -> int:
    """The global rank of the attack rank that serves `trainer` (the last ranks attack)."""
    return trainers + trainer % attackers


def served_by(attacker: int, trainers: int, attackers: int) -> list[int]:
    """The trainers the attack rank of global rank `attacker` serves."""
    return [r for r in range(trainers) if attacker_of(r, trainers, attackers) == attacker]


def my_attack_team(rank: int, trainers: int, world_size: int) -> list[int]:
    """This rank's attack rank and the trainers it serves, in rank order."""
    attackers = world_size - trainers
    attacker = rank if rank >= trainers else attacker_of(rank, trainers, attackers)
    return sorted([attacker, *served_by(attacker, trainers, attackers)])


@dataclass(frozen=True)
class JobGroups:
    """The groups of a job with attack ranks: the trainers (who own the batch and the
    optimizer), trainer 0 with the attack ranks (the weights go out over it), this rank's
    attack team on gloo (an attack rank and its trainers: the views' headers, checked on the
    host; a few ranks each, so no rank opens a connection to every other), and the job's
    store (trainer 0's heartbeat)."""

    trainers: Any
    weights: Any
    headers: Any
    store: Any


# the group conadv's collectives run over: None (every rank) unless the job has attack ranks,
# which are the ranks from _trainer_count on
_trainers_group: Any = None
_trainer_count: int | None = None


def trainers_group() -> Any:
    """The trainers' process group (None: the whole world), e.g. for DDP."""
    return _trainers_group


def is_trainer() -> bool:
    """Whether this process takes part in the trainers' collectives (not an attack rank)."""
    return _trainer_count is None or rank() < _trainer_count


@contextmanager
def process_group(env: DistEnv, device: torch.device, backend: str, timeout_s: int,
                  trainers: int | None = None) -> Iterator[JobGroups | None]:
    """Initialise torch.distributed for a multi-process job and always tear it down.
    `trainers` < world size: the last ranks attack (adv.attack_ranks); yields their groups."""
    global _trainers_group, _trainer_count
    if not env.is_distributed:
        yield None
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    timeout = timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                       timeout=timeout))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        # torchrun may hand restarted workers the same agent store: without a per-attempt
        # prefix they read the dead workers' gloo/NCCL addresses and fail to connect.
        store = dist.PrefixStore(f"conadv/attempt_{restart}", store)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    groups = None
    if trainers is not None and trainers < env.world_size:
        # every rank creates the first two groups, in the same order, and only its own team's
        # (local synchronisation); the attack ranks wait for the next step's weights through
        # evaluations and checkpoints, so theirs has no deadline a long evaluation could reach
        # (they watch trainer 0's heartbeat instead)
        groups = JobGroups(dist.new_group(list(range(trainers))),
                           dist.new_group([0, *range(trainers, env.world_size)],
                                          timeout=max(timeout, timedelta(days=7))),
                           dist.new_group(my_attack_team(env.rank, trainers, env.world_size),
                                          backend="gloo", timeout=timeout,
                                          use_local_synchronization=True),
                           store)
        _trainers_group, _trainer_count = groups.trainers, trainers
    try:
        yield groups
        # leave together: rank 0 hosts the rendezvous store, and a rank that exits while
        # another still talks to it can abort the other at shutdown
        dist.barrier()
    finally:
        _trainers_group, _trainer_count = None, None
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Processes that train (1 in a single process; the attack ranks do not count)."""
    return dist.get_world_size(_trainers_group) if is_initialized() else 1


def compress_gradients(ddp: torch.nn.parallel.DistributedDataParallel, compression: str,
                       group: Any) -> None:
    """dist.grad_compression=bf16: DDP all-reduces each gradient bucket in bfloat16 (torch's
    `bf16_compress_hook`: the bucket is cast, divided by the world size, summed over `group`
    and cast back), half the bytes of fp32 on the wire; `none` keeps DDP's own fp32 path."""
    if compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(group, default_hooks.bf16_compress_hook)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in a single process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_trainers_group)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): DDP broadcasts them only
    at the start of a forward, so after training each rank holds its own last update."""
    if is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0, group=_trainers_group)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks in place (a no-op in a single process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_trainers_group)
    return tensor


def all_reduce_max_async(tensor: torch.Tensor) -> Any:
    """Start a maximum over ranks in place; returns the work to wait for."""
    return dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True, group=_trainers_group)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of a small picklable object, on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_trainers_group)
    return box[0]


def broadcast_state(state: Any, device: torch.device) -> Any:
    """Rank 0's nested state (dicts, lists, tuples, tensors and plain values) on every rank,
    its tensors in host memory, as `torch.load(map_location="cpu")` gives them: the structure
    travels as one small pickled object and the tensors' bytes as one buffer through `device`
    (not one pickled blob, which NCCL would copy through the host twice). Host tensors, because
    views of one device buffer would keep all of it allocated for as long as any of them lives
    (an optimizer keeps what it loads when the device and dtype already match), and an Adam
    step counter on a GPU makes every step read it back to the host. Other ranks pass anything
    (None); rank 0 gets its own state back."""
    if not is_initialized():
        return state
    tensors: list[torch.Tensor] = []
    skeleton = _hollow(state, tensors) if dist.get_rank() == 0 else None
    layout = [(t.shape, t.dtype) for t in tensors]
    skeleton, layout = broadcast_object((skeleton, layout))
    offsets, total = [], 0
    for shape, dtype in layout:  # 16-byte aligned, so every slice views as its dtype
        offsets.append(total)
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        total += -(-size // 16) * 16
    buffer = torch.empty(total, dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        for tensor, offset in zip(tensors, offsets):
            raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            buffer[offset:offset + raw.numel()].copy_(raw)
    dist.broadcast(buffer, src=0, group=_trainers_group)
    if dist.get_rank() == 0:
        return state
    buffer = buffer.cpu()
    received = []
    for (shape, dtype), offset in zip(layout, offsets):
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        received.append(buffer[offset:offset + size].view(dtype).reshape(shape).clone())
    return _filled(skeleton, iter(received))


class _Slot:
    """Where a tensor was in a state being broadcast."""


def _hollow(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot()
    if isinstance(obj, dict):
        return {key: _hollow(value, tensors) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_hollow(value, tensors) for value in obj)
    return obj


def _filled(obj: Any, tensors: Iterator[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return next(tensors)
    if isinstance(obj, dict):
        return {key: _filled(value, tensors) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_filled(value, tensors) for value in obj)
    return obj


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's value of a small picklable object, in rank order."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj, group=_trainers_group)
    return gathered


def barrier() -> None:
    if is_initialized():
        dist.barrier(group=_trainers_group)
