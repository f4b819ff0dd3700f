"""The CUDA path, tested where no GPU is at hand: meta-device optimizer state, fp16 attacks on
a CPU autocast, evaluation over two gloo ranks, a GPU job that finds CUDA unusable,
device-timed attacks, and the queue's memory. (The side stream's ordering is checked by
tests/test_stream_order.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F

from conadv.adversarial.attacks import input_gradient
from conadv.distributed import DistEnv, gpus_given, pick_device
from conadv.errors import ConfigError
from conadv.models.factory import CifarResNet, ImageClassifier
from conadv.optim.lamb import LAMB
from conadv.train.step_metrics import MetricWindow, StepResult
from conadv.train.trainer import Trainer
from tests.helpers import (
    SINGLE,
    TINY,
    run_module,
    run_torchrun,
    tiny_config,
)


def test_lamb_state_follows_its_parameters_after_a_load():
    """torch leaves a loaded `step` on the CPU (neither fused nor capturable); the fused Adam
    kernel of LAMB's CUDA path then sees tensors on two devices."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = LAMB([{"params": params, "weight_decay": 0.01}], lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()

    meta = [torch.nn.Parameter(torch.empty(4, 3, device="meta")),
            torch.nn.Parameter(torch.empty(3, device="meta"))]
    moved = LAMB([{"params": meta, "weight_decay": 0.01}], lr=0.1)
    moved.load_state_dict(optimizer.state_dict())
    for p in meta:
        assert {name: t.device.type for name, t in moved.state[p].items()} == {
            "step": "meta", "exp_avg": "meta", "exp_avg_sq": "meta"}
        p.grad = torch.empty_like(p)
    moved.step()


def test_fp16_attack_gradients_do_not_underflow():
    """The attack takes the sign of d(loss)/d(input). With a mean over 256 images, fp16
    gradients underflow to 0 (measured: 0.32% of entries on this model); with the sum the
    attack uses, the zeros left are exact cancellations of the CPU's low-precision
    convolutions, a fraction of a per mille (fp16 accumulates in fp16; bf16 kernels on CPUs
    with native bf16 round to its 8-bit mantissa: 0.06% measured on an AMD EPYC), and none
    in fp32."""
    torch.manual_seed(0)
    model = ImageClassifier(CifarResNet(10, width=16))
    x, goal = torch.rand(256, 3, 32, 32), torch.randint(0, 10, (256,))

    def zeros(dtype, reduction="sum"):
        autocast = None if dtype is None else (lambda: torch.autocast("cpu", dtype=dtype))
        if reduction == "sum":
            grad = input_gradient(model, x, goal, autocast)
        else:  # what the attack did before
            leaf = x.clone().requires_grad_(True)
            with autocast():
                loss = F.cross_entropy(model(leaf).float(), goal)
            (grad,) = torch.autograd.grad(loss, leaf)
        return (grad == 0).float().mean().item()

    fp32, fp16, fp16_mean = zeros(None), zeros(torch.float16), zeros(torch.float16, "mean")
    assert fp32 == 0 and zeros(torch.bfloat16) < 1e-3
    assert fp16_mean > 1e-3  # the underflow the sum removes: the comparison below can fail
    assert fp16 <= fp32 + 2e-4 and fp16 <= fp16_mean / 20


@pytest.mark.slow
def test_final_evaluation_of_two_ranks_equals_conadv_eval_of_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    trained = run_torchrun(2, *TINY, "train.max_steps=5", "adv.enabled=true",
                           "train.deterministic=false", f"log.run_dir={run}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = json.loads((run / "summary.json").read_text())["final_eval"]
    evaluated = run_module("conadv.cli.evaluate", "--config", str(run / "config.yaml"),
                           "--checkpoint", str(run))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    standalone = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert standalone["count"] == final["count"] == 360
    assert standalone["top1"] == final["top1"]
    assert standalone["loss"] == pytest.approx(final["loss"], rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")
@pytest.mark.parametrize("environ", [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"SLURM_JOB_GPUS": "3"}])
def test_a_job_given_gpus_does_not_quietly_train_on_the_cpu(monkeypatch, environ):
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="was given GPUs .* train.device=cpu"):
        pick_device("auto", SINGLE)
    assert pick_device("cpu", SINGLE).type == "cpu"  # the documented way out


def test_gpu_evidence_from_the_launcher():
    torchrun = DistEnv("torchrun", 0, 2, 0, "h", 1)
    assert gpus_given(torchrun, "nccl", {}) == "torchrun with dist.backend=nccl"
    assert gpus_given(torchrun, "gloo", {}) is None
    assert gpus_given(SINGLE, "auto", {"CUDA_VISIBLE_DEVICES": ""}) is None
    assert gpus_given(SINGLE, "auto", {"CUDA_VISIBLE_DEVICES": "-1"}) is None


class _TimedEvent:
    def __init__(self, at_ms):
        self.at_ms = at_ms

    def elapsed_time(self, other):
        return other.at_ms - self.at_ms


def test_attack_time_on_cuda_is_the_device_time_of_the_attack():
    window = MetricWindow(torch.device("cpu"))
    result = StepResult(loss=torch.tensor(1.0), attack_seconds=0.002, source_step=3)
    result.cuda_events = {"train_begin": _TimedEvent(0.0), "train_end": _TimedEvent(100.0),
                          "attack_begin": _TimedEvent(10.0), "attack_end": _TimedEvent(70.0)}
    window.add(result)
    record = window.record(world_size=1)
    assert record["attack_time"] == pytest.approx(0.060)  # 60 ms on the device
    assert record["attack_launch_time"] == pytest.approx(0.002)  # what the host spent
    assert record["overlap"] == pytest.approx(1.0)


def test_queued_batches_keep_only_the_adversarial_view_on_the_device(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "adv.enabled=true", "adv.tau=2",
                                  "train.accumulation=2", "train.max_steps=3"),
                      SINGLE, torch.device("cpu"))
    trainer.train_step()
    assert len(trainer.engine.queue) == 4
    for pending in trainer.engine.queue:
        assert set(pending.launched.value) == {"adv"}  # the adversarial images only
        assert pending.batch["image"].dtype == torch.uint8  # the clean view waits as loaded


def test_a_compile_mode_that_captures_cuda_graphs_is_refused_off_cuda_in_one_sentence(
        tmp_path):
    from conadv.errors import ConfigError

    cfg = tiny_config(tmp_path, "train.compile=true", "train.compile_mode=reduce-overhead")
    with pytest.raises(ConfigError, match="captures CUDA graphs, which need a CUDA device"):
        Trainer(cfg, SINGLE, torch.device("cpu"))
    from conadv.train.runtime import attack_compiler, compiler

    assert compiler(False, "reduce-overhead", torch.device("cpu")) is None
    chosen = compiler(True, "max-autotune-no-cudagraphs", torch.device("cpu"))
    assert chosen.keywords == {"mode": "max-autotune-no-cudagraphs"}
    # the attack on its side stream never captures CUDA graphs: the same mode without them
    assert attack_compiler(True, "reduce-overhead", torch.device("cpu")) is torch.compile
    assert attack_compiler(True, "max-autotune", torch.device("cpu")).keywords == {
        "mode": "max-autotune-no-cudagraphs"}


@pytest.mark.slow
def test_compiled_training_matches_eager_and_compiles_a_fixed_number_of_graphs(tmp_path,
                                                                             monkeypatch):
    """torch.compile of the training forward and of the attack: the BatchNorm routes (main +
    adversarial for training, adversarial with frozen statistics for the attack) give one
    graph each, compiled once; later steps reuse them."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    # dynamo's graphs and AOT autograd as the trainer uses them, without inductor's C++ code
    # generation (minutes on 2 cores; its kernels are torch's to test)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    run = ["adv.enabled=true", "adv.tau=1", "train.max_steps=20", "train.deterministic=false"]
    eager = Trainer(tiny_config(tmp_path / "eager", *run), SINGLE, torch.device("cpu"))
    expected = [eager.train_step().loss.item() for _ in range(5)]

    torch._dynamo.reset()
    counters.clear()
    compiled = Trainer(tiny_config(tmp_path / "compiled", *run, "train.compile=true"), SINGLE,
                       torch.device("cpu"))
    losses, graphs = [], []
    for _ in range(5):
        losses.append(compiled.train_step().loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)
    assert graphs[0] == graphs[-1] <= 3  # compiled on the first step, never again
