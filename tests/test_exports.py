"""conadv-eval's exports: the ONNX inference model, checked against PyTorch. (AutoAttack is
tested on the demo model in test_cli.py: it needs a model that is robust to something.)"""

import pytest
import torch

from conadv.config import ModelConfig
from conadv.data.loader import build_source
from conadv.models import build_model
from conadv.models.multi_bn import main_state_dict
from conadv.models.onnx_export import LOGIT_TOLERANCE
from conadv.train.eval_job import run_evaluation
from conadv.train.job import train
from tests.helpers import checkpoint_state, tiny_config

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A ConAdv run (auxiliary BatchNorm) on the digits, a few steps."""
    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(run_dir, "adv.enabled=true", "train.max_steps=3"))
    return run_dir


def test_the_onnx_model_computes_the_evaluated_model_on_real_images(digits_run, tmp_path):
    out = tmp_path / "model.onnx"
    result = run_evaluation(tiny_config(digits_run), digits_run, onnx_to=out)
    assert result["onnx_max_logit_difference"] <= LOGIT_TOLERANCE
    images = torch.stack([build_source(tiny_config(digits_run).data, "val").load(i)
                          for i in range(12)]).float().div(255)
    images = torch.nn.functional.interpolate(images, size=32, mode="bilinear")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    model = build_model(ModelConfig(arch="cifar_resnet", cifar_width=8), 10)
    model.load_state_dict(main_state_dict(checkpoint_state(digits_run)["model"]))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])  # batch of 12
    with torch.no_grad():
        expected = model.eval()(images)
        training_mode = model.train()(images)  # what a graph with batch statistics computes
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) / scale <= LOGIT_TOLERANCE
    assert float((got - training_mode).abs().max()) / scale > 100 * LOGIT_TOLERANCE


def test_an_existing_onnx_file_is_kept_without_force(digits_run, tmp_path, capsys):
    from conadv.cli import evaluate

    out = tmp_path / "model.onnx"
    out.write_bytes(b"someone else's")
    with pytest.raises(SystemExit) as exited:
        evaluate.main(["--checkpoint", str(digits_run), "--export-onnx", str(out)])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "--export-onnx" in error and "--force" in error, error
    assert out.read_bytes() == b"someone else's"
