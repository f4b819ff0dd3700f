"""Datasets, transforms, samplers and loaders. Loaders yield uint8 images; conversion to float
and normalization happen on the device (normalization is the model's first layer)."""

from conadv.data.loader import BatchStream, build_eval_loader, build_train_stream
from conadv.data.sampler import ExactShardSampler, ResumableShardSampler

__all__ = [
    "BatchStream",
    "ExactShardSampler",
    "ResumableShardSampler",
    "build_eval_loader",
    "build_train_stream",
]
