"""Data-parallel training through a real torchrun rendezvous (gloo on CPU)."""

import functools
from pathlib import Path

import pytest
import torch

from conadv.distributed import detect_env, expand_nodelist
from conadv.train.job import train
from tests.helpers import (
    TINY,
    assert_same_parameters,
    checkpoint_state,
    run_module,
    run_torchrun,
)


def test_expand_slurm_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                       "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[9-11]-ib") == ["a9-ib", "a10-ib", "a11-ib"]


def test_detect_environment():
    assert detect_env({}).launcher == "single"
    torchrun = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "h", "MASTER_PORT": "1234", "SLURM_PROCID": "0",
                           "SLURM_NTASKS": "2"})
    assert (torchrun.launcher, torchrun.rank, torchrun.world_size, torchrun.local_rank) == (
        "torchrun", 3, 8, 1)
    slurm = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "gpu[10-11]", "SLURM_JOB_ID": "4242"})
    assert (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank) == ("slurm", 5, 8, 1)
    assert (slurm.master_addr, slurm.master_port) == ("gpu10", 24242)


EQUIVALENCE = [*TINY, "train.global_batch=32", "train.max_steps=6", "train.deterministic=false",
               "optim.weight_decay=1e-3", "data.min_crop_scale=0.5"]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_accumulation(tmp_path):
    two = run_torchrun(2, *EQUIVALENCE, f"log.run_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_module("conadv.cli.train", *EQUIVALENCE, "train.accumulation=2",
                     f"log.run_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "1 ranks x 2 accumulation" in one.stderr and "2 ranks x 1 accumulation" in two.stderr

    a, b = checkpoint_state(tmp_path / "two"), checkpoint_state(tmp_path / "one")
    assert a["step"] == b["step"] == 6
    assert_same_parameters(a, b)


@pytest.mark.slow
def test_conadv_two_ranks_equal_one_rank_with_accumulation(tmp_path):
    adv = [*EQUIVALENCE, "adv.enabled=true", "adv.tau=1"]
    two = run_torchrun(2, *adv, f"log.run_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_module("conadv.cli.train", *adv, "train.accumulation=2",
                     f"log.run_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = checkpoint_state(tmp_path / "two"), checkpoint_state(tmp_path / "one")
    assert_same_parameters(a, b, at_least=40)  # main and auxiliary BatchNorm parameters


def _read_on_rank_zero(rank: int, world: int, path: str) -> dict:
    from conadv.checkpoints.format import load_state_everywhere

    state = load_state_everywhere(Path(path) if rank == 0 else None, torch.device("cpu"))
    return {"step": state["step"], "config": state["config"],
            "model": {k: (str(v.dtype), v.numpy().copy()) for k, v in state["model"].items()},
            "own_storage": all(v.untyped_storage().nbytes() == v.nbytes
                               for v in state["model"].values())}


def test_a_checkpoint_is_read_by_rank_zero_and_received_by_the_others(tmp_path):
    """Rank 1 is not given the path: what it holds came over the wire, dtypes included."""
    from tests.helpers import newest_checkpoint, run_gloo_ranks, tiny_config

    train(tiny_config(tmp_path / "run", "train.max_steps=2", "adv.enabled=true"))
    checkpoint = newest_checkpoint(tmp_path / "run")
    ranks = run_gloo_ranks(2, functools.partial(_read_on_rank_zero, path=str(checkpoint)),
                           tmp_path)
    saved = torch.load(checkpoint / "state.pt", weights_only=True)
    assert ranks[1]["step"] == saved["step"] and ranks[1]["config"] == saved["config"]
    assert {dtype for dtype, _ in ranks[1]["model"].values()} == {"torch.float32",
                                                                  "torch.int64"}
    for name, value in saved["model"].items():
        dtype, received = ranks[1]["model"][name]
        assert dtype == str(value.dtype) and (received == value.numpy()).all(), name
    assert ranks[1]["own_storage"]  # not views that would keep one buffer alive


def _refused_everywhere(rank: int, world: int, path: str) -> str:
    from conadv.checkpoints.format import load_state_everywhere
    from conadv.errors import CheckpointError

    try:
        load_state_everywhere(Path(path) if rank == 0 else None, torch.device("cpu"))
    except CheckpointError as err:
        return str(err)
    return "loaded"


def test_a_checkpoint_rank_zero_refuses_is_refused_on_every_rank(tmp_path):
    """Rank 1 must not wait for a state that will not come."""
    from tests.helpers import newest_checkpoint, run_gloo_ranks, tiny_config

    train(tiny_config(tmp_path / "run", "train.max_steps=1"))
    checkpoint = newest_checkpoint(tmp_path / "run")
    (checkpoint / "state.pt").write_bytes(b"not a checkpoint")
    errors = run_gloo_ranks(2, functools.partial(_refused_everywhere, path=str(checkpoint)),
                            tmp_path)
    assert errors[0] == errors[1] and errors[0] != "loaded"


def _bf16_all_reduce_runs(rank: int, world: int, root: str) -> dict:
    """Rank `rank` of three 2-rank runs: fp32 all-reduce, bf16 all-reduce, and bf16 stopped at
    step 2 and resumed; with the bytes the bf16 hook hands to the all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from conadv.distributed import DistEnv
    from conadv.train.trainer import Trainer
    from tests.helpers import fit, tiny_config

    sent: list[int] = []
    hook = default_hooks.bf16_compress_hook

    def counted(state, bucket):
        assert bucket.buffer().dtype == torch.float32
        sent.append(2 * bucket.buffer().numel())  # the bfloat16 copy that goes out
        return hook(state, bucket)

    default_hooks.bf16_compress_hook = counted
    env = DistEnv("torchrun", rank, world, rank, "127.0.0.1", 0)
    common = ["train.max_steps=4", "train.deterministic=false", "checkpoint.every_steps=100"]

    def trained(name: str, *extra: str) -> Trainer:
        trainer = Trainer(tiny_config(Path(root) / name, *common, *extra), env,
                          torch.device("cpu"))
        fit(trainer)
        return trainer

    trained("fp32")
    trainer = trained("bf16", "dist.grad_compression=bf16")
    bytes_per_step = sum(sent) / 4
    trained("resumed", "dist.grad_compression=bf16", "train.stop_at_step=2")
    trained("resumed", "dist.grad_compression=bf16", "checkpoint.resume=auto")
    gradients = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    # each rank counts the job's compute: 4 steps x the global batch of 32 over both ranks
    assert trainer.progress.compute.train_images == 4 * 32
    return {"bytes_per_step": bytes_per_step, "fp32_bytes_per_step": 4 * gradients}


def test_bf16_gradient_all_reduce_sends_half_the_bytes_and_resumes_exactly(tmp_path):
    from tests.helpers import assert_same_run_state, run_gloo_ranks

    ranks = run_gloo_ranks(2, functools.partial(_bf16_all_reduce_runs, root=str(tmp_path)),
                           tmp_path)
    assert ranks[0]["bytes_per_step"] == ranks[0]["fp32_bytes_per_step"] / 2
    bf16, fp32 = checkpoint_state(tmp_path / "bf16"), checkpoint_state(tmp_path / "fp32")
    assert_same_run_state(bf16, checkpoint_state(tmp_path / "resumed"))
    weights = [name for name in fp32["model"] if fp32["model"][name].is_floating_point()]
    differences = [(bf16["model"][n] - fp32["model"][n]).abs().max().item() for n in weights]
    # the hook is really on (the runs differ), and bf16 sums move the weights very little
    assert max(differences) > 0
    assert max(differences) < 1e-2, max(differences)
