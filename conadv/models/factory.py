"""Builds the classifier a config asks for."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50, resnet101, resnet152
from torchvision.models.resnet import BasicBlock

from conadv.config import ModelConfig, shown
from conadv.errors import ConfigError
from conadv.models.multi_bn import main_state_dict

# ImageNet channel statistics in [0, 1] pixel scale (torchvision's weights use the same).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std as the model's first layer: inputs stay in [0, 1] pixel space."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Normalization followed by a backbone whose state_dict is plain torchvision's."""

    def __init__(self, backbone: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


class CifarResNet(nn.Module):
    """A small ResNet for 32x32 inputs (3x3 stem, three stages of torchvision BasicBlocks)."""

    def __init__(self, num_classes: int, width: int = 16, blocks: int = 1,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, in_ch = [], width
        for i, out_ch in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(blocks):
                down = None
                if b == 0 and (stride != 1 or in_ch != out_ch):
                    down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                         nn.BatchNorm2d(out_ch))
                layers.append(BasicBlock(in_ch, out_ch, stride if b == 0 else 1, down))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def timm_backbone(name: str, num_classes: int) -> tuple[nn.Module, tuple, tuple]:
    """A timm model, never downloading weights, with the input mean and std it expects."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"arch timm:{name} needs timm (pip install timm)") from None
    try:
        try:  # transformers take any input size (small test images, another test resolution)
            backbone = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                         dynamic_img_size=True)
        except TypeError:  # convolutional networks take any size anyway, and not this keyword
            backbone = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ConfigError(f"timm has no model '{name}' ({err})") from None
    pretrained = dict(getattr(backbone, "pretrained_cfg", {}) or {})
    return (backbone, tuple(pretrained.get("mean", IMAGENET_MEAN)),
            tuple(pretrained.get("std", IMAGENET_STD)))


Backbone = Callable[[ModelConfig, int], nn.Module]


def _torchvision(resnet: Callable[..., nn.Module]) -> Backbone:
    def build(cfg: ModelConfig, classes: int) -> nn.Module:
        return resnet(weights=None, num_classes=classes,
                      zero_init_residual=cfg.zero_init_residual)
    return build


def _cifar_resnet(cfg: ModelConfig, classes: int) -> nn.Module:
    return CifarResNet(classes, cfg.cifar_width, cfg.cifar_blocks, cfg.zero_init_residual)


# model.arch's names (and a teacher's arch); "timm:<name>" names any of timm's models besides
ARCHITECTURES: dict[str, Backbone] = {
    "resnet18": _torchvision(resnet18), "resnet34": _torchvision(resnet34),
    "resnet50": _torchvision(resnet50), "resnet101": _torchvision(resnet101),
    "resnet152": _torchvision(resnet152), "cifar_resnet": _cifar_resnet,
}


def check_arch(key: str, arch: str) -> None:
    """One sentence unless `arch` (the value of config key `key`) is a name of
    ARCHITECTURES or timm:<name>, a name timm builds locally."""
    if arch not in ARCHITECTURES and not (arch.startswith("timm:") and len(arch) > len("timm:")):
        raise ConfigError(f"{key} must be one of {', '.join(ARCHITECTURES)} or timm:<name>; "
                          f"got {shown(arch)}")
    if ":" in arch.removeprefix("timm:"):  # timm's hf-hub:/local-dir: read a config remotely
        raise ConfigError(f"{key}={shown(arch)} names a model hub entry, which would be "
                          "downloaded; conadv builds timm models by name (timm:<name>) and "
                          "takes weights from a local file (model.init_from)")


def build_model(cfg: ModelConfig, num_classes: int) -> ImageClassifier:
    """num_classes: the dataset's, unless the config sets its own."""
    check_arch("model.arch", cfg.arch)
    classes = cfg.num_classes or num_classes
    if cfg.arch.startswith("timm:"):
        backbone, mean, std = timm_backbone(cfg.arch.removeprefix("timm:"), classes)
        model = ImageClassifier(backbone, mean, std)
    else:
        model = ImageClassifier(ARCHITECTURES[cfg.arch](cfg, classes))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def export_state_dict(model: ImageClassifier) -> dict[str, torch.Tensor]:
    """The backbone's weights (main BatchNorm only), loadable into the plain torchvision model
    with strict=True."""
    return {k: v.detach().clone() for k, v in main_state_dict(model.backbone.state_dict()).items()}
