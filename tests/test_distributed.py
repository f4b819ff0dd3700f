"""Data-parallel training through a real torchrun rendezvous (gloo on CPU)."""

import pytest

from conadv.distributed import detect_env, expand_nodelist
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
