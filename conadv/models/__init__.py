"""Model factory: torchvision ResNets and a small CIFAR-style ResNet, each behind an input
normalization layer so that callers (and attacks) work in [0, 1] pixel space."""

from conadv.models.factory import (
    ARCHITECTURES,
    ImageClassifier,
    build_model,
    check_arch,
    export_state_dict,
)

__all__ = ["ARCHITECTURES", "ImageClassifier", "build_model", "check_arch", "export_state_dict"]
