"""Ensemble distillation (MEAL V2): soft targets, losses, frozen teachers, resume, init_from."""

import logging

import numpy as np
import pytest
import torch
import torchvision
from torch.nn.parallel import DistributedDataParallel

from conadv.config import TeacherConfig, load_config
from conadv.distill import DiscriminatorTrainer, TeacherEnsemble
from conadv.distill.teachers import build_teacher
from conadv.errors import CheckpointError, ConfigError
from conadv.models.factory import CifarResNet, ImageClassifier
from conadv.train.job import train
from conadv.train.parts import check_factories
from conadv.train.trainer import Trainer
from tests.helpers import (
    CPU,
    SINGLE,
    assert_same_run_state,
    checkpoint_state,
    count_collectives,
    fit,
    run_gloo_ranks,
    run_module,
    teacher_files,
    the_error_line,
    tiny_config,
)


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory):
    """Two small teachers trained by conadv itself (conadv checkpoints), different seeds."""
    root = tmp_path_factory.mktemp("teachers")
    runs = []
    for seed in (0, 1):
        run = root / f"teacher{seed}"
        train(tiny_config(run, "train.max_steps=6", "model.cifar_width=12", f"train.seed={seed}"))
        runs.append(run)
    return runs


def _distill(teacher_runs, *extra: str) -> list[str]:
    teachers = ", ".join(f"{{weights: {run}}}" for run in teacher_runs)
    return ["distill.enabled=true", f"distill.teachers=[{teachers}]", *extra]


def _numpy_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ soft targets


def test_soft_targets_are_the_mean_of_the_teachers_softmax():
    torch.manual_seed(0)
    teachers = [ImageClassifier(CifarResNet(10, width=w)).eval() for w in (4, 8, 6)]
    images = torch.rand(12, 3, 32, 32)
    ensemble = TeacherEnsemble(teachers, temperature=2.0)
    expected = np.mean([_numpy_softmax(t(images).detach().numpy(), 2.0) for t in teachers],
                       axis=0)
    soft = ensemble(images)
    np.testing.assert_allclose(soft.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not soft.requires_grad
    # a guard: one teacher alone is not the ensemble
    assert np.abs(_numpy_softmax(teachers[0](images).detach().numpy(), 2.0) - expected).max() > 1e-3


def test_every_view_gets_its_soft_targets(teacher_runs, tmp_path):
    """Clean and augmented images get the teachers' outputs on themselves; the adversarial
    view gets those of its clean image."""
    trainer = Trainer(tiny_config(tmp_path, *_distill(teacher_runs), "adv.enabled=true",
                                  "adv.tau=0", "data.augment=autoaugment",
                                  "data.second_view=true"), SINGLE, CPU)
    batch, key = trainer.stream.next()
    trainer.engine.feed(batch, key, 0)
    inputs = trainer.engine.take()
    assert [v for v, _, _ in inputs.views] == ["clean", "aug", "adv"]
    rows = inputs.labels.shape[0]
    clean, aug = inputs.images[:rows], inputs.images[rows:2 * rows]
    ensemble = trainer.engine.context.teachers
    expected = torch.cat([ensemble(clean), ensemble(aug), ensemble(clean)])
    torch.testing.assert_close(inputs.soft_targets, expected, rtol=1e-6, atol=1e-7)


def test_a_timm_state_dict_teacher_gives_timm_s_probabilities(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "teacher.pth")
    teacher, _ = build_teacher(TeacherConfig(weights=str(tmp_path / "teacher.pth"),
                                             arch="timm:resnet18"), 0, num_classes=10)
    images = torch.rand(4, 3, 64, 64)
    mean = torch.tensor(reference.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(reference.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(reference((images - mean) / std), dim=1)
    torch.testing.assert_close(TeacherEnsemble([teacher], 1.0)(images), expected)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


# ------------------------------------------------------------------ losses


def _student_gradient(trainer, inputs) -> list[torch.Tensor]:
    trainer.model.zero_grad(set_to_none=True)
    with trainer.engine.forward_context(inputs):
        logits = trainer.model(inputs.images)
    loss, _ = trainer.objective(logits, inputs)
    loss.backward()
    return [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("hard_weight, same", [(0.0, True), (0.5, False)])
def test_with_hard_weight_0_the_labels_do_not_reach_the_gradient(teacher_runs, tmp_path,
                                                                 hard_weight, same):
    trainer = Trainer(tiny_config(tmp_path, *_distill(teacher_runs),
                                  f"distill.hard_weight={hard_weight}",
                                  "distill.discriminator=true"), SINGLE, CPU)
    batch, key = trainer.stream.next()
    trainer.engine.feed(batch, key, 0)
    inputs = trainer.engine.take()
    before = _student_gradient(trainer, inputs)
    permuted = torch.roll(inputs.targets, 1)
    assert not torch.equal(permuted, inputs.targets)
    inputs.targets, inputs.labels = permuted, torch.roll(inputs.labels, 1)
    after = _student_gradient(trainer, inputs)
    assert len(before) > 20
    assert all(torch.equal(a, b) for a, b in zip(before, after)) == same


def test_the_discriminator_learns_and_the_student_loss_leaves_it_alone():
    torch.manual_seed(0)
    disc = DiscriminatorTrainer(num_classes=10, lr=1e-2, temperature=1.0, device=CPU, seed=0)
    teacher = torch.softmax(torch.randn(64, 10) * 4, dim=1)  # confident
    student_logits = torch.randn(64, 10, requires_grad=True)  # unsure
    student_logits.data *= 0.1
    disc.fooling_loss(student_logits).backward()
    assert student_logits.grad is not None
    assert all(p.grad is None for p in disc.model.parameters())
    first = disc.learn(student_logits, teacher, accumulation=1)
    disc.step()
    for _ in range(200):
        last = disc.learn(student_logits, teacher, accumulation=1)
        disc.step()
    assert last["disc_loss"] < 0.5 * first["disc_loss"]
    assert last["disc_accuracy"] > 0.95


# ------------------------------------------------------------------ training


def _frozen_state(ensemble: TeacherEnsemble) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in t.state_dict().items()} for t in ensemble.teachers]


def test_teachers_are_bit_identical_after_training_and_get_no_grad(teacher_runs, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, *_distill(teacher_runs), "train.max_steps=4",
                                  "adv.enabled=true", "adv.tau=1",
                                  "distill.discriminator=true"), SINGLE, CPU)
    ensemble = trainer.engine.context.teachers
    before = _frozen_state(ensemble)
    student_before = trainer.model.backbone.fc.weight.detach().clone()
    summary = fit(trainer)
    assert summary["finished"] and summary["training"] == "ConAdv tau=1 + distillation"
    # the compute it counted: 4 steps x 32 clean images through every teacher
    assert summary["compute"]["teacher_images"] == 4 * 32 * len(ensemble.teachers)
    assert summary["compute"]["train_images"] == 4 * 32 * 2  # clean and adversarial views
    for teacher, saved in zip(ensemble.teachers, before):
        assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())
        assert all(p.grad is None for p in teacher.parameters())
        assert any("running_mean" in k for k in saved)  # buffers were compared too
    assert not torch.equal(trainer.model.backbone.fc.weight, student_before)  # it did train


def _count_on_rank(rank: int, world: int) -> tuple[int, int, bool]:
    torch.manual_seed(0)
    teachers = [ImageClassifier(CifarResNet(10, width=4)).eval().requires_grad_(False)
                for _ in range(2)]
    ensemble = TeacherEnsemble(teachers, 1.0)
    student = ImageClassifier(CifarResNet(10, width=4))
    ddp = DistributedDataParallel(student)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    teacher_calls = count_collectives(lambda: ensemble(x))
    train_calls = count_collectives(lambda: ddp(x).sum().backward())
    # the discriminator averages its gradients over ranks: the same D on every rank
    disc = DiscriminatorTrainer(10, lr=1e-2, temperature=1.0, device=CPU, seed=0)
    disc.learn(torch.randn(8, 10, generator=torch.Generator().manual_seed(rank)),
               ensemble(x), accumulation=1)
    disc.step()
    flat = torch.cat([p.detach().reshape(-1) for p in disc.model.parameters()])
    return teacher_calls, train_calls, flat.tolist()


@pytest.mark.slow
def test_teacher_inference_makes_no_collective_call(tmp_path):
    results = run_gloo_ranks(2, _count_on_rank, tmp_path)
    for rank, (teacher_calls, train_calls, _) in results.items():
        assert teacher_calls == 0, f"rank {rank}: teachers made {teacher_calls} collective calls"
        assert train_calls > 0  # the counter does see DDP's gradient all-reduce
    assert results[0][2] == results[1][2]


@pytest.mark.parametrize("method", [[], ["adv.enabled=true", "adv.tau=1"]],
                         ids=["distill", "distill+conadv-tau1"])
def test_stop_and_resume_with_distillation_is_bit_identical(teacher_runs, tmp_path, method):
    run = [*_distill(teacher_runs), "distill.discriminator=true", "train.max_steps=7",
           "checkpoint.every_steps=100", "train.accumulation=2", *method]
    straight = train(tiny_config(tmp_path / "straight", *run))
    train(tiny_config(tmp_path / "split", *run, "train.stop_at_step=3"))
    resumed = train(tiny_config(tmp_path / "split", *run, "checkpoint.resume=auto"))
    assert resumed["resumed_from"].endswith("step-00000003") and resumed["finished"]
    a, b = checkpoint_state(tmp_path / "straight"), checkpoint_state(tmp_path / "split")
    assert_same_run_state(a, b)  # the discriminator and its Adam state included
    assert straight["final_eval"] == resumed["final_eval"]
    # no teacher output in the checkpoint: the queue is saved as source steps and weights
    assert set(a["engine"]) == ({"tau", "sources", "snapshots"} if method else set())


def test_a_resume_with_a_changed_teacher_file_stops_naming_it(tmp_path, caplog):
    run = ["distill.enabled=true", teacher_files(tmp_path), "train.max_steps=4",
           "checkpoint.every_steps=100"]
    train(tiny_config(tmp_path / "run", *run, "train.stop_at_step=2"))
    torch.manual_seed(9)  # another teacher under the same name
    torch.save(CifarResNet(10, width=8).state_dict(), tmp_path / "teacher1.pt")
    with pytest.raises(CheckpointError, match=r"distill.teachers\[1\]'s weights file changed "
                                              "since the checkpoint was written"):
        train(tiny_config(tmp_path / "run", *run, "checkpoint.resume=auto"))
    with caplog.at_level(logging.WARNING):
        resumed = train(tiny_config(tmp_path / "run", *run, "checkpoint.resume=auto",
                                    "checkpoint.allow_config_change=true"))
    assert resumed["finished"] and "continuing with the new teachers" in caplog.text


# ------------------------------------------------------------------ model.init_from


def test_init_from_loads_a_torchvision_resnet18_state_dict_strictly(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    trainer = Trainer(tiny_config(tmp_path / "run", "model.arch=resnet18",
                                  "model.num_classes=1000",
                                  f"model.init_from={tmp_path / 'resnet18.pth'}"), SINGLE, CPU)
    ours = {k: v for k, v in trainer.model.backbone.state_dict().items() if ".aux." not in k}
    for key, value in reference.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_init_from_names_a_wrong_key_in_one_sentence(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer1.0.conv9.weight"] = state.pop("layer1.0.conv1.weight")
    torch.save(state, tmp_path / "renamed.pth")
    result = run_module("conadv.cli.train", "model.arch=resnet18", "model.num_classes=1000",
                        f"model.init_from={tmp_path / 'renamed.pth'}", "data.workers=0",
                        "train.device=cpu", f"log.run_dir={tmp_path / 'run'}")
    line = the_error_line(result)
    assert "missing keys layer1.0.conv1.weight" in line
    assert "unexpected keys layer1.0.conv9.weight" in line


def test_init_from_not_strict_fine_tunes_to_new_classes(tmp_path, caplog):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny_config(tmp_path / "run", "model.arch=resnet18",
                                      f"model.init_from={tmp_path / 'resnet18.pth'}",
                                      "model.init_strict=false"), SINGLE, CPU)
    assert "2 keys of another shape, e.g. fc.weight (1000, 512) vs (10, 512)" in caplog.text
    backbone = trainer.model.backbone
    assert torch.equal(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert backbone.fc.weight.shape == (10, 512)


def test_init_from_a_conadv_run_directory(teacher_runs, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "model.cifar_width=12",
                                  f"model.init_from={teacher_runs[0]}"), SINGLE, CPU)
    saved = checkpoint_state(teacher_runs[0])["model"]
    assert torch.equal(trainer.model.backbone.fc.weight, saved["backbone.fc.weight"])


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("overrides, words", [
    (["distill.enabled=true"], "needs at least one teacher"),
    (["distill.discriminator=true"], "needs distill.enabled=true"),
    (["distill.enabled=true", "distill.teachers=[{weights: a.pt}]", "train.mixup_alpha=0.2"],
     "must be 0 with distill.enabled"),
    (["distill.enabled=true", "distill.teachers=[{weights: a.pt, arch: vgg}]"],
     "distill.teachers[0].arch must be one of"),
    (["distill.enabled=true", "distill.teachers=[{wieghts: a.pt}]"],
     "did you mean 'distill.teachers[0].weights'"),
    (["distill.enabled=true", "distill.teachers=a.pt"], "must be a list of sections"),
    (["schedule.decay=step"], "needs schedule.step_epochs"),
])
def test_config_mistakes_are_named(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        check_factories(load_config(None, overrides))


@pytest.mark.parametrize("arch", ["resnet101", "resnet152"])
def test_a_deep_torchvision_teacher_loads_its_state_dict(tmp_path, arch):
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    torch.save(reference.state_dict(), tmp_path / "teacher.pth")
    teacher, _ = build_teacher(TeacherConfig(weights=str(tmp_path / "teacher.pth"), arch=arch),
                               0, num_classes=10)
    assert torch.equal(teacher.backbone.layer3[-1].conv2.weight,
                       reference.layer3[-1].conv2.weight)


def test_a_teacher_state_dict_without_arch_or_file_is_named(tmp_path):
    torch.save(ImageClassifier(CifarResNet(10)).backbone.state_dict(), tmp_path / "t.pth")
    with pytest.raises(ConfigError, match=r"distill.teachers\[1\].arch must name"):
        build_teacher(TeacherConfig(weights=str(tmp_path / "t.pth")), 1, 10)
    with pytest.raises(ConfigError, match="does not exist"):
        build_teacher(TeacherConfig(weights=str(tmp_path / "nope.pth"), arch="resnet18"), 0, 10)
    with pytest.raises(ConfigError, match=r"fc.weight \(10, 64\) vs \(5, 64\)"):
        build_teacher(TeacherConfig(weights=str(tmp_path / "t.pth"), arch="cifar_resnet"), 0, 5)
    data = (tmp_path / "t.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"distill.teachers\[0\].weights: .*cut.pth cannot "
                                              "be read as a PyTorch state dict"):
        build_teacher(TeacherConfig(weights=str(tmp_path / "cut.pth"), arch="cifar_resnet"), 0,
                      10)
