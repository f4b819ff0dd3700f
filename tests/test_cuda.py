"""CUDA-only checks (skipped without a GPU): the attack stream gives the sequential results, and
steady-state training steps make no host synchronisation."""

import pytest
import torch

from conadv.train.trainer import Trainer
from tests.helpers import (
    SINGLE,
    checkpoint_state,
    teacher_files,
    tiny_config,
)

pytestmark = pytest.mark.cuda

CUDA_RUN = ["train.device=cuda", "adv.enabled=true", "adv.tau=1", "train.max_steps=6",
            "train.precision=fp32", "model.cifar_width=16"]


def _trained(run_dir, *overrides) -> dict[str, torch.Tensor]:
    trainer = Trainer(tiny_config(run_dir, *CUDA_RUN, *overrides), SINGLE, torch.device("cuda"))
    for _ in range(6):
        trainer.train_step()
    torch.cuda.synchronize()
    return {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}


def _assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture
def slow_side_jobs(monkeypatch):
    """Every side job (attack, teachers) starts with ~50 ms of GPU sleep on its stream, so it
    finishes long after the main stream would need its result: a missing wait reads
    unfinished adversarial images, or lets the optimizer overwrite weights an attack reads,
    every time instead of by chance (the tiny model's attack is otherwise done first)."""
    from conadv.adversarial.engine import LookaheadEngine

    original = LookaheadEngine._prepare

    def slow(self, *args, **kwargs):
        torch.cuda._sleep(100_000_000)  # cycles: ~50 ms at 2 GHz
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LookaheadEngine, "_prepare", slow)


def test_stream_executor_matches_sequential(tmp_path, slow_side_jobs):
    stream = _trained(tmp_path / "s", "adv.executor=stream")
    sequential = _trained(tmp_path / "q", "adv.executor=sequential")
    _assert_close_states(stream, sequential)


@pytest.mark.parametrize("tau", [1, 2])
def test_a_cuda_checkpoint_resumes_the_stream_run(tmp_path, slow_side_jobs, tau):
    """Stop at step 3 with the side stream busy (the host copy of the model and of the
    queue's weight snapshots happens while attacks run), resume, and end where the sequential
    run ends."""
    from conadv.train.job import train

    run = [*CUDA_RUN, f"adv.tau={tau}", "checkpoint.every_steps=100"]
    train(tiny_config(tmp_path / "q", *run, "adv.executor=sequential"))
    train(tiny_config(tmp_path / "s", *run, "adv.executor=stream", "train.stop_at_step=3"))
    resumed = train(tiny_config(tmp_path / "s", *run, "adv.executor=stream",
                                "checkpoint.resume=auto"))
    assert resumed["resumed_from"].endswith("step-00000003")
    a, b = checkpoint_state(tmp_path / "q"), checkpoint_state(tmp_path / "s")
    _assert_close_states(a["model"], b["model"])
    assert sorted(a["engine"]["sources"]) == sorted(b["engine"]["sources"])


def _assert_steps_make_no_host_synchronisation(trainer: Trainer) -> None:
    for _ in range(3):  # warm-up: allocator, cuDNN plans, momentum buffers
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_steady_state_steps_make_no_host_synchronisation(tmp_path, precision):
    trainer = Trainer(tiny_config(tmp_path, *CUDA_RUN, f"train.precision={precision}",
                                  "train.max_steps=20", "train.deterministic=false"),
                      SINGLE, torch.device("cuda"))
    _assert_steps_make_no_host_synchronisation(trainer)


@pytest.mark.parametrize("adv", ["true", "false"])
def test_teachers_on_the_stream_match_sequential(tmp_path, adv, slow_side_jobs):
    """Distillation with the teachers (and the attack) on the side stream gives the weights of
    the sequential run; with ConAdv off the teachers run one step ahead."""
    distill = ["distill.enabled=true", teacher_files(tmp_path), "distill.discriminator=true",
               f"adv.enabled={adv}"]
    stream = _trained(tmp_path / "s", *distill, "adv.executor=stream")
    sequential = _trained(tmp_path / "q", *distill, "adv.executor=sequential")
    _assert_close_states(stream, sequential)


def test_distillation_steps_make_no_host_synchronisation(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, *CUDA_RUN, "distill.enabled=true",
                                  teacher_files(tmp_path), "distill.discriminator=true",
                                  "train.max_steps=20", "train.deterministic=false"),
                      SINGLE, torch.device("cuda"))
    _assert_steps_make_no_host_synchronisation(trainer)
