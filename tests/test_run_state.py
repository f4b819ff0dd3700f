"""Run state at scale: checkpoints that do not grow with the batch, resume on another number of
ranks or accumulation split, config drift refused (or allowed on request), and the layering
that keeps ConAdv inside conadv/adversarial."""

import ast
import json
import math
import re

import pytest
import torch

from conadv.distributed import DistEnv
from conadv.errors import ConfigError
from conadv.optim.schedules import WarmupDecay
from conadv.train.job import train
from conadv.train.trainer import Trainer
from tests.helpers import (
    REPO,
    TINY,
    assert_same_parameters,
    checkpoint_state,
    fit,
    newest_checkpoint,
    run_module,
    run_torchrun,
    teacher_files,
    the_error_line,
    tiny_config,
)


def _checkpoint_bytes(run_dir) -> int:
    return sum(f.stat().st_size for f in newest_checkpoint(run_dir).iterdir())


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def test_conadv_checkpoint_does_not_grow_with_the_batch(tmp_path):
    sizes = {}
    for batch in (64, 512):
        run = tmp_path / str(batch)
        train(tiny_config(run, "adv.enabled=true", "adv.tau=2", f"train.global_batch={batch}",
                          "train.max_steps=3", "train.stop_at_step=2",
                          "checkpoint.every_steps=100", "schedule.warmup_epochs=0"))
        state = checkpoint_state(run)
        assert state["engine"]["sources"] == [0, 1]  # two queued steps, made at steps 0 and 1
        assert sorted(state["engine"]["snapshots"]) == [0, 1]
        # no image of any batch anywhere: the largest tensor is a weight
        images = [t for t in _tensors(state) if t.dim() == 4 and t.shape[0] in (64, 512)
                  and t.shape[-1] == 32]
        assert not images
        sizes[batch] = _checkpoint_bytes(run)
    assert sizes[512] / sizes[64] <= 1.1, sizes


def test_a_changed_trajectory_key_stops_the_resume_naming_it(tmp_path):
    base = ["adv.enabled=true", "adv.tau=2", "train.max_steps=4", "checkpoint.every_steps=100"]
    train(tiny_config(tmp_path, *base, "train.stop_at_step=2"))
    for change, key in [("train.epochs=3", "train.epochs"), ("optim.lr=0.2", "optim.lr"),
                        ("adv.tau=1", "adv.tau"), ("adv.enabled=false", "adv.enabled")]:
        with pytest.raises(ConfigError, match=re.escape(key)) as caught:
            train(tiny_config(tmp_path, *base, change, "checkpoint.resume=auto"))
        assert "checkpoint.allow_config_change=true" in str(caught.value)
        assert "log.run_dir" in str(caught.value)


def test_the_cli_reports_config_drift_in_one_line_with_exit_2(tmp_path):
    run = [*TINY, f"log.run_dir={tmp_path}", "train.max_steps=3", "checkpoint.every_steps=1"]
    first = run_module("conadv.cli.train", *run, "train.stop_at_step=1")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_module("conadv.cli.train", *run, "optim.lr=0.3", "train.max_steps=5",
                       "checkpoint.resume=auto")
    error = the_error_line(again)
    assert "optim.lr 0.1 -> 0.3" in error and "train.max_steps 3 -> 5" in error


def test_free_keys_resume_silently(tmp_path, caplog):
    base = ["train.max_steps=4", "checkpoint.every_steps=100"]
    train(tiny_config(tmp_path, *base, "train.stop_at_step=2"))
    resumed = train(tiny_config(tmp_path, *base, "log.every_steps=3", "data.workers=1",
                                "checkpoint.keep_last=5", "checkpoint.resume=auto"))
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["finished"]
    assert "changed config" not in caplog.text


def test_allowed_config_change_continues_on_the_new_schedule(tmp_path, caplog):
    base = ["train.max_steps=6", "checkpoint.every_steps=100", "schedule.decay=cosine"]
    train(tiny_config(tmp_path, *base, "train.stop_at_step=3"))
    resumed = train(tiny_config(tmp_path, "train.max_steps=12", "optim.lr=0.3",
                                "checkpoint.every_steps=100", "checkpoint.resume=auto",
                                "checkpoint.allow_config_change=true"))
    assert resumed["resumed_from"].endswith("step-00000003") and resumed["steps"] == 12
    assert "optim.lr 0.1 -> 0.3" in caplog.text and "train.max_steps 6 -> 12" in caplog.text
    # 44 steps per epoch at batch 32 on the digits: warm-up round(0.1 * 44) = 4 steps
    schedule = WarmupDecay(peak_lr=0.3, total_steps=12, warmup_steps=4)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    for step in range(4, 13):  # `lr` of record `step` is the rate of the next optimizer step
        assert math.isclose(logged[step], schedule(step), rel_tol=1e-9, abs_tol=1e-12), step


def test_allowed_switch_from_vanilla_to_conadv_starts_the_auxiliary_bn_as_the_trained_main(
        tmp_path):
    """The auxiliary BatchNorm of the adversarial view is a copy of the checkpoint's main
    BatchNorm, as when a model is converted, not the untrained initial values."""
    train(tiny_config(tmp_path, "train.max_steps=6", "train.stop_at_step=4",
                      "checkpoint.every_steps=100"))
    vanilla = checkpoint_state(tmp_path)["model"]
    switched = Trainer(tiny_config(tmp_path, "train.max_steps=6", "adv.enabled=true",
                                   "checkpoint.every_steps=100", "checkpoint.resume=auto",
                                   "checkpoint.allow_config_change=true"),
                       DistEnv("single", 0, 1, 0, "127.0.0.1", 0), torch.device("cpu"))
    state = switched.model.state_dict()
    auxiliary = [key for key in state if ".aux.adv." in key]
    assert len(auxiliary) >= 5 * 4  # weight, bias, running mean/var, count of every BN
    for key in auxiliary:
        assert torch.equal(state[key], vanilla[key.replace("aux.adv.", "")]), key
    trained = [key for key in vanilla if key.endswith("running_mean")]
    assert all(vanilla[key].abs().sum() > 0 for key in trained)  # not the initial zeros
    summary = fit(switched)
    assert summary["training"] == "ConAdv tau=1" and summary["finished"]


# ------------------------------------------------------------------ another layout

LAYOUT = [*TINY, "train.global_batch=32", "train.max_steps=6", "train.deterministic=false",
          "optim.weight_decay=1e-3", "data.min_crop_scale=0.5", "checkpoint.every_steps=100"]


def _one_rank(run_dir, *extra):
    result = run_module("conadv.cli.train", *LAYOUT, "train.accumulation=2",
                        f"log.run_dir={run_dir}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _two_ranks(run_dir, *extra):
    result = run_torchrun(2, *LAYOUT, f"log.run_dir={run_dir}", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# vanilla training is the engine's plain path, which the ConAdv case runs too (clean view)
METHODS = {
    "conadv": ["adv.enabled=true", "adv.tau=2"],
    "distill+discriminator": ["distill.enabled=true", "distill.discriminator=true",
                              "distill.discriminator_lr=1e-2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_resume_on_another_number_of_ranks_continues_the_trajectory(tmp_path, method):
    adv = METHODS[method] + ([teacher_files(tmp_path)] if "distill" in method else [])
    _one_rank(tmp_path / "straight", *adv)
    reference = checkpoint_state(tmp_path / "straight")

    _two_ranks(tmp_path / "two_then_one", *adv, "train.stop_at_step=3")
    resumed = _one_rank(tmp_path / "two_then_one", *adv, "checkpoint.resume=auto")
    assert "resumed from" in resumed.stderr and "step-00000003" in resumed.stderr
    assert_same_parameters(reference, checkpoint_state(tmp_path / "two_then_one"))

    _one_rank(tmp_path / "one_then_two", *adv, "train.stop_at_step=3")
    resumed = _two_ranks(tmp_path / "one_then_two", *adv, "checkpoint.resume=auto")
    assert "step-00000003" in resumed.stderr
    assert_same_parameters(reference, checkpoint_state(tmp_path / "one_then_two"))

    # guard (of the comparison itself, so once): a resume that skips or repeats one step's
    # batches lands outside the tolerance
    if method == "conadv":
        for shift in (1, -1):
            _assert_shifted_resume_differs(tmp_path / f"shift{shift}", adv, reference, shift)


def _assert_shifted_resume_differs(run_dir, adv, reference, shift):
    from conadv.config import load_config
    from conadv.data.loader import BatchStream

    overrides = [*LAYOUT, "train.accumulation=2", f"log.run_dir={run_dir}", *adv]
    threads = torch.get_num_threads()
    seek = BatchStream.seek
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1)
    try:
        train(load_config(None, [*overrides, "train.stop_at_step=3"]))
        BatchStream.seek = lambda self, step: seek(self, step + shift if step else 0)
        train(load_config(None, [*overrides, "checkpoint.resume=auto"]))
    finally:
        BatchStream.seek = seek
        torch.set_num_threads(threads)
    with pytest.raises(AssertionError):
        assert_same_parameters(reference, checkpoint_state(run_dir))


# ------------------------------------------------------------------ layering


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_conadv_lives_behind_one_door():
    trainer = REPO / "conadv" / "train" / "trainer.py"
    imported = _imports(trainer)
    assert not imported & {"conadv.models.multi_bn", "conadv.adversarial.executors",
                           "conadv.adversarial.engine"}
    assert not re.search(r"cfg\.adv\.\w+", trainer.read_text())
    assert "conadv.train.trainer" not in _imports(REPO / "conadv" / "train" / "eval_job.py")


@pytest.mark.parametrize("extra, views, attack_steps", [
    ([], 1, 0),
    (["adv.enabled=true", "adv.tau=1", "adv.steps=2"], 2, 2),
])
def test_the_summary_counts_the_compute_of_the_trajectory(tmp_path, extra, views, attack_steps):
    """Image passes counted, from the batch plan written out here: global batch x steps x
    views through the training forward and backward, x attack steps through the attack; a run
    stopped and resumed counts what a straight one does (the queue it threw away is not the
    trajectory's)."""
    steps, batch = 4, 32  # tiny_config's global batch
    train_images, attack = steps * batch * views, steps * batch * attack_steps
    expected = {"train_images": train_images, "attack_image_steps": attack,
                "teacher_images": 0, "counted_from_step": 0,
                "forward_equivalents": 3 * train_images + 2 * attack}
    straight = train(tiny_config(tmp_path / "straight", f"train.max_steps={steps}", *extra))
    assert straight["compute"] == expected
    train(tiny_config(tmp_path / "resumed", f"train.max_steps={steps}", "train.stop_at_step=2",
                      *extra))
    resumed = train(tiny_config(tmp_path / "resumed", f"train.max_steps={steps}",
                                "checkpoint.resume=auto", *extra))
    assert resumed["compute"] == expected and resumed["resumed_from"]


def test_a_checkpoint_from_before_compute_was_counted_counts_from_its_step():
    from conadv.train.state import Compute, Progress

    progress = Progress(torch.device("cpu"), True, world_size=4, teachers=2)
    progress.load_state_dict({"step": 5, "bad_images": 0})
    assert progress.compute.counted_from_step == 5 and progress.compute.train_images == 0
    progress.count(images=8, attack_image_steps=24, teacher_images=16)
    assert (progress.compute.train_images, progress.compute.attack_image_steps,
            progress.compute.teacher_images) == (32, 96, 128)  # x 4 ranks (x 2 teachers)
    assert progress.compute.forward_equivalents() == 3 * 32 + 2 * 96  # the student's only
    for wrong in [None, {"train_images": -1}, {"counted_from_step": 6}, {"flops": 1}]:
        with pytest.raises(ValueError, match="compute is not the counts"):
            progress.load_state_dict({"step": 5, "bad_images": 0, "compute": wrong})
    progress.load_state_dict({"step": 5, "bad_images": 0, "compute": {"train_images": 7}})
    assert progress.compute == Compute(train_images=7)  # a count added later starts at 0
