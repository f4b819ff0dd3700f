"""timm models as students: built without downloads, ConAdv's auxiliary BatchNorm on any model
whose normalisation is BatchNorm2d (timm's BatchNormAct2d included), one sentence otherwise."""

import copy

import pytest
import torch

from conadv.config import ModelConfig
from conadv.errors import ConfigError
from conadv.models import build_model
from conadv.models.multi_bn import MultiBatchNorm2d, bn_views, convert_to_multi_bn
from conadv.train.job import train
from tests.helpers import tiny_config

timm = pytest.importorskip("timm")


def test_conadv_trains_a_timm_resnet_on_the_digits(tmp_path):
    summary = train(tiny_config(tmp_path, "model.arch=timm:resnet18", "adv.enabled=true",
                                "train.max_steps=2", "train.global_batch=16"))
    assert summary["steps"] == 2 and summary["final_eval"]["count"] > 0
    state = torch.load(next((tmp_path / "checkpoints").glob("step-*")) / "state.pt",
                       weights_only=True)["model"]
    assert "backbone.bn1.aux.adv.running_mean" in state  # the auxiliary BatchNorm is there
    plain = timm.create_model("resnet18", pretrained=False, num_classes=10)
    plain.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                           if ".aux." not in k})  # exported names are timm's own


def test_batchnorm_act_layers_keep_their_activation_after_conversion():
    """timm's EfficientNet normalises with BatchNormAct2d (normalise, then activate): the
    converted layer computes the same function, in training and in evaluation."""
    model = build_model(ModelConfig(arch="timm:efficientnet_b0"), 10)
    original = copy.deepcopy(model)
    convert_to_multi_bn(model, ["adv"])
    assert any(isinstance(m, MultiBatchNorm2d) and hasattr(m, "act") for m in model.modules())
    images = torch.rand(4, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        original.train(training)
        torch.testing.assert_close(model(images), original(images), rtol=1e-5, atol=1e-5)
    model.train()
    with bn_views(model, [("adv", 4)]):  # the auxiliary route works through the activation
        assert model(images).shape == (4, 10)


def test_a_vit_with_auxiliary_batchnorm_is_one_sentence_and_trains_without_it(tmp_path):
    vit = ["model.arch=timm:vit_tiny_patch16_224", "adv.enabled=true", "train.max_steps=1",
           "train.global_batch=16"]
    with pytest.raises(ConfigError, match=r"LayerNorm .* set adv.aux_bn=false"):
        train(tiny_config(tmp_path / "a", *vit))
    summary = train(tiny_config(tmp_path / "b", *vit, "adv.aux_bn=false"))
    assert summary["steps"] == 1


def test_an_unknown_timm_model_is_one_sentence():
    with pytest.raises(ConfigError, match="timm has no model 'resnet_nonexistent'"):
        build_model(ModelConfig(arch="timm:resnet_nonexistent"), 10)
