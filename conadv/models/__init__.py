"""Model factory: torchvision ResNets and a small CIFAR-style ResNet, each behind an input
normalization layer so that callers (and attacks) work in [0, 1] pixel space."""

from conadv.models.factory import ImageClassifier, build_model, export_state_dict

__all__ = ["ImageClassifier", "build_model", "export_state_dict"]
