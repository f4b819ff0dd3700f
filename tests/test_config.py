"""Config loading and validation: every user mistake is one clear sentence."""

import pytest
import torch

from conadv.config import RunConfig, TrainConfig, load_config, plan_batch, to_yaml
from conadv.data.loader import build_source
from conadv.errors import ConfigError
from conadv.models import build_model
from conadv.optim import build_optimizer
from conadv.train.parts import check_factories
from tests.helpers import REPO, TINY, run_module


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["optim.lr=0.25", "model.channels_last=true", "data.name=synthetic"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.lr == 0.25 and cfg.train.epochs == 3.0
    assert cfg.model.channels_last is True and cfg.data.name == "synthetic"
    assert cfg.train.global_batch == 256  # schema default survives


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.epochs=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: resnet50\n  chanels_last: true\n")
    with pytest.raises(ConfigError,
                       match=r"'model.chanels_last' in .*bad.yaml.*'model.channels_last'"):
        load_config(path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'train.epochs'.*expects a value of type float.*'ten'"):
        load_config(None, ["train.epochs=ten"])


@pytest.mark.parametrize("override, message", [
    ("optim.momentum=1.5", "optim.momentum' must be at most 1.0"),
    ("train.global_batch=0", "train.global_batch' must be at least 1"),
    ("train.epochs=0", "train.epochs' must be greater than 0.0"),
])
def test_out_of_range_and_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["optim.lr"])


def test_batch_plan_derives_and_rejects():
    def plan(g, b=0, a=0, w=1):
        return plan_batch(TrainConfig(global_batch=g, per_device_batch=b, accumulation=a), w)

    assert (plan(96 * 1024, w=1024).per_device, plan(96 * 1024, w=1024).accumulation) == (96, 1)
    assert plan(98304, b=192, w=64).accumulation == 8
    assert plan(256, a=2, w=4).per_device == 32
    assert plan(256, b=32, a=2, w=4).global_batch == 256
    with pytest.raises(ConfigError, match=r"global_batch=256 is not .*per_device_batch=30"):
        plan(256, b=30, a=2, w=4)
    with pytest.raises(ConfigError, match="not divisible by train.per_device_batch=48"):
        plan(256, b=48, w=2)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        plan(256, w=3)


def test_batch_plan_derives_accumulation_from_the_device_limit():
    def plan(g, w, limit):
        p = plan_batch(TrainConfig(global_batch=g, max_per_device_batch=limit), w)
        return p.per_device, p.accumulation

    assert plan(98304, 64, 256) == (256, 6)      # 96K on 8 nodes x 8 GPUs
    assert plan(98304, 1024, 256) == (96, 1)     # 96K on 128 nodes x 8 GPUs
    assert plan(98304, 64, 200) == (192, 8)      # the largest divisor of 1536 under 200
    assert plan(1000, 1, 7) == (5, 200)          # 1000 = 2^3 5^3: nothing between 6 and 7


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("args, message", [
    (["optim.lrr=0.1"], "did you mean 'optim.lr'"),
    (["train.epochs=abc"], "'train.epochs'"),
    (["train.global_batch=100", "train.per_device_batch=30"], "train.global_batch=100"),
])
def test_cli_reports_one_line_and_exits_non_zero(args, message, tmp_path):
    result = run_module("conadv.cli.train", "--config", str(REPO / "configs/demo.yaml"),
                        f"log.run_dir={tmp_path}", *args, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("conadv-train: error: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_dali_settings_are_checked_in_one_sentence_whether_or_not_dali_is_installed():
    # every view the torchvision path serves is served by DALI too: the recipe loads
    load_config(None, [*TINY, "data.loader=dali", "data.name=imagefolder", "data.root=/x",
                       "data.augment=autoaugment", "data.second_view=true", "adv.enabled=true"])
    with pytest.raises(ConfigError, match="decodes image files"):
        check_factories(load_config(None, [*TINY, "data.loader=dali"]))


@pytest.mark.parametrize("override, message", [
    ("data.name=imagenet", "'data.name' must be one of digits, mnist, synthetic, imagefolder, "
                           "shards; got 'imagenet'"),
    ("data.loader=nvjpeg", "'data.loader' must be one of auto, torchvision, dali"),
    ("model.arch=vgg", "model.arch must be one of resnet18, .*, cifar_resnet or timm:<name>; "
                       "got 'vgg'"),
    ("optim.name=adamw", "'optim.name' must be one of sgd, lars, lamb; got 'adamw'"),
    ("optim.backend=apex", "optim.backend=apex provides only FusedLAMB"),
    ("data.name=shards", "data.root must name the directory of shards"),
])
def test_the_factories_refuse_the_names_they_do_not_serve(override, message):
    """The config module does not know the registries' names (it sits below them): loading
    accepts any string, the factories' check refuses it in one sentence, as does the factory
    itself when it is called without the check."""
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=message):
        check_factories(cfg)
    build = {"data": lambda: build_source(cfg.data, "train"),
             "model": lambda: build_model(cfg.model, 10),
             "optim": lambda: build_optimizer([("w", torch.nn.Parameter(torch.ones(1)))],
                                              cfg.optim, 0.1)}[override.split(".")[0]]
    with pytest.raises(ConfigError, match=message):
        build()


def test_a_registered_optimizer_is_a_valid_name_without_touching_the_config(monkeypatch):
    """Adding a name is one registration beside its factory: the config, its checks and
    `--help-config` take it from the registry."""
    from conadv.optim import OPTIMIZERS, register_optimizer
    from conadv.train.parts import registered_names

    monkeypatch.setitem(OPTIMIZERS, "plain_sgd", None)  # restored after the test
    register_optimizer("plain_sgd")(
        lambda groups, cfg, lr: torch.optim.SGD([{"params": g["params"]} for g in groups], lr))
    cfg = load_config(None, ["optim.name=plain_sgd"])
    check_factories(cfg)
    assert "plain_sgd" in registered_names()["optim.name"]
    optimizer = build_optimizer([("w", torch.nn.Parameter(torch.ones(1)))], cfg.optim, 0.1)
    assert type(optimizer) is torch.optim.SGD


def test_a_renamed_key_names_its_new_name():
    with pytest.raises(ConfigError, match="'adv.eval_robust' in the command line was renamed "
                                          "to 'eval.robust'"):
        load_config(None, ["adv.eval_robust=true"])


def test_conadv_eval_refuses_a_name_before_it_reads_the_checkpoint(tmp_path):
    from conadv.train.eval_job import run_evaluation

    with pytest.raises(ConfigError, match="'data.name' must be one of"):
        run_evaluation(load_config(None, ["data.name=imagenet"]), tmp_path / "no-checkpoint")
    with pytest.raises(ConfigError, match="model.arch must be one of"):
        run_evaluation(load_config(None, ["model.arch=vgg"]), tmp_path / "no-checkpoint")
