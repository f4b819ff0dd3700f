"""The ImageNet presets load, validate, and carry the published hyper-parameters."""

import pytest

from conadv.config import load_config, plan_batch
from conadv.errors import ConfigError
from conadv.train.job import train
from conadv.train.parts import check_factories
from tests.helpers import REPO, tiny_config

# batch: (peak LR, warm-up epochs, momentum, poly power) from the MLPerf ResNet-50 LARS policy
# (and the ConAdv release for 96K)
PUBLISHED = {
    "1k": (1024, 10.0, 5, 0.9, 2.0), "2k": (2048, 10.0, 5, 0.9, 2.0),
    "4k": (4096, 10.0, 5, 0.9, 2.0), "8k": (8192, 10.0, 5, 0.9, 2.0),
    "16k": (16384, 25.0, 5, 0.9, 2.0), "32k": (32768, 31.2, 25, 0.9, 2.0),
    "64k": (65536, 29.0, 18, 0.93, 2.0), "96k": (98304, 43.0, 41, 0.9, 1.6),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_matches_the_published_table(name):
    batch, lr, warmup, momentum, power = PUBLISHED[name]
    cfg = load_config(REPO / f"configs/imagenet/resnet50_{name}.yaml", ["data.root=/data/in"])
    assert cfg.train.global_batch == batch
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("lars", lr, momentum)
    assert cfg.optim.trust_coefficient == 0.001 and cfg.train.label_smoothing == 0.1
    assert (cfg.schedule.warmup_epochs, cfg.schedule.decay, cfg.schedule.poly_power) == (
        warmup, "poly", power)
    assert cfg.schedule.end_lr == 1e-4 and cfg.model.arch == "resnet50"
    assert plan_batch(cfg.train, world_size=64).per_device * 64 == batch


def test_preset_without_data_root_says_what_to_set():
    with pytest.raises(ConfigError, match="data.root must name the imagefolder directory"):
        check_factories(load_config(REPO / "configs/imagenet/resnet50_96k.yaml"))


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_training_runs_with_each_large_batch_optimizer(tmp_path, optimizer):
    lr = {"lars": "optim.lr=2.0", "lamb": "optim.lr=0.01"}[optimizer]
    summary = train(tiny_config(tmp_path, f"optim.name={optimizer}", lr, "train.epochs=2",
                                "schedule.decay=poly", "train.deterministic=false"))
    assert summary["finished"] and summary["final_eval"]["top1"] > 40  # 10 classes: chance 10


def test_conadv_preset_is_the_published_96k_recipe():
    cfg = load_config(REPO / "configs/imagenet/resnet50_96k_conadv.yaml", ["data.root=/data/in"])
    vanilla = load_config(REPO / "configs/imagenet/resnet50_96k.yaml", ["data.root=/data/in"])
    assert (cfg.optim, cfg.schedule, cfg.train) == (vanilla.optim, vanilla.schedule,
                                                    vanilla.train)
    adv = cfg.adv
    assert adv.enabled and adv.tau == 1 and adv.steps == 1 and adv.targeted
    assert adv.epsilon == adv.step_size == 9 / 255 and adv.random_start_prob == 0.8
    assert adv.aux_bn and adv.aug_bn and (adv.clean_weight, adv.aug_weight, adv.adv_weight) == (
        1.0, 1.0, 1.0)
    assert cfg.data.augment == "autoaugment" and cfg.data.second_view
    assert "76.2%" in (REPO / "configs/imagenet/resnet50_96k_conadv.yaml").read_text()


def test_mealv2_preset_is_the_released_recipe():
    teachers = ('distill.teachers=[{weights: /w/senet154.pth, arch: "timm:senet154"}, '
                '{weights: /w/resnet152s.pth, arch: "timm:resnet152s"}]')
    cfg = load_config(REPO / "configs/imagenet/resnet50_mealv2.yaml",
                      ["data.root=/data/in", "model.init_from=/w/resnet50.pth", teachers])
    assert [t.arch for t in cfg.distill.teachers] == ["timm:senet154", "timm:resnet152s"]
    d = cfg.distill
    assert d.enabled and d.discriminator and d.discriminator_lr == 1e-4
    assert (d.temperature, d.soft_weight, d.hard_weight) == (1.0, 1.0, 0.0)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        "sgd", 0.01, 0.9, 0.0)
    assert (cfg.schedule.decay, cfg.schedule.step_epochs, cfg.schedule.step_factor) == (
        "step", [100.0], 0.1)
    assert (cfg.train.epochs, cfg.train.global_batch, cfg.train.label_smoothing) == (
        180, 512, 0.0)
    assert cfg.model.arch == "resnet50" and not cfg.adv.enabled
    assert "80.67%" in (REPO / "configs/imagenet/resnet50_mealv2.yaml").read_text()
    with pytest.raises(ConfigError, match="needs at least one teacher"):
        load_config(REPO / "configs/imagenet/resnet50_mealv2.yaml", ["data.root=/data/in"])
