"""ONNX export of the inference model, checked with onnxruntime before it is kept.

The exported graph is what evaluation runs: the input normalisation, then the backbone with
its main BatchNorm in evaluation mode (never an auxiliary one), in float32, with a dynamic
batch dimension. torch's exporter (`dynamo=True`, the maintained one) writes it; onnxruntime
then runs it on a seeded batch and its logits must match PyTorch's within
`LOGIT_TOLERANCE` (max absolute difference, relative to the largest logit's magnitude, or
absolute below 1): float32 kernels of two runtimes differ by accumulation order, about 1e-6
of the logits' scale here, and a wrong graph (a missing normalisation, training-mode
BatchNorm) by orders of magnitude more.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch
from torch import nn

from conadv.errors import ConfigError, ExportError

LOGIT_TOLERANCE = 1e-4


def _onnx_tools():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 (torch's exporter needs it)
    except ImportError:
        raise ConfigError("--export-onnx needs onnx, onnxscript and onnxruntime: "
                          "pip install '.[onnx]'") from None
    return onnxruntime


def export_onnx(model: nn.Module, path: Path, image_size: int) -> float:
    """Write `model` (an ImageClassifier holding the weights to export) to `path` as ONNX and
    return the largest logit difference onnxruntime shows against PyTorch (relative, see the
    module doc); refuses to keep a file beyond the tolerance."""
    runtime = _onnx_tools()
    model = model.float().cpu().eval()
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports progress on stdout
        torch.onnx.export(model, (example,), tmp, dynamo=True, input_names=["images"],
                          output_names=["logits"], dynamic_shapes=({0: batch},),
                          external_data=False)
    check = torch.rand(5, 3, image_size, image_size,
                       generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(check)
    session = runtime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": check.numpy()})[0])
    difference = float((got - expected).abs().max() / max(1.0, float(expected.abs().max())))
    if got.shape != expected.shape or not difference <= LOGIT_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"the ONNX model's logits differ from PyTorch's by {difference:.2e} "
                           f"(tolerance {LOGIT_TOLERANCE:.0e}); nothing was written")
    os.replace(tmp, path)
    return difference
