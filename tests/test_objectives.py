"""What the student minimises (conadv/train/objectives.py), against the published equations
written out here: the weighted mean over views, and a term across views (TRADES' KL) that
only the objective and its config knob had to know about."""

import pytest
import torch
import torch.nn.functional as F

from conadv.adversarial.engine import TrainInputs
from conadv.config import load_config
from conadv.errors import ConfigError
from conadv.train.job import train
from conadv.train.objectives import CrossEntropy, Trades, build_objective
from tests.helpers import tiny_config


def _inputs(rows: int = 6) -> tuple[torch.Tensor, TrainInputs]:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3 * rows, 10, generator=generator)
    labels = torch.randint(0, 10, (rows,), generator=generator)
    views = [("clean", rows, 1.0), ("aug", rows, 0.5), ("adv", rows, 2.0)]
    return logits, TrainInputs(torch.zeros(3 * rows, 1), labels.repeat(3), labels, views, key=0)


def test_the_loss_is_the_weighted_mean_of_the_views_cross_entropy():
    logits, inputs = _inputs()
    loss, stats = CrossEntropy(label_smoothing=0.1)(logits, inputs)
    parts = [F.cross_entropy(logits[i * 6:(i + 1) * 6], inputs.labels, label_smoothing=0.1)
             for i in range(3)]
    torch.testing.assert_close(loss, (parts[0] + 0.5 * parts[1] + 2.0 * parts[2]) / 3.5)
    torch.testing.assert_close(stats["adv_loss"], parts[2])
    wrong = (logits[12:].argmax(1) != inputs.labels).float().mean()
    torch.testing.assert_close(stats["adv_success"], wrong)


def test_the_trades_term_is_beta_times_the_kl_from_clean_to_adversarial():
    logits, inputs = _inputs()
    plain, _ = CrossEntropy(0.0)(logits, inputs)
    loss, stats = Trades(0.0, beta=6.0)(logits, inputs)
    clean, adv = logits[:6].softmax(1), logits[12:].softmax(1)
    kl = (clean * (clean.log() - adv.log())).sum(1).mean()  # nats per image
    torch.testing.assert_close(stats["trades_kl"], kl)
    torch.testing.assert_close(loss, plain + 6.0 * kl)


def test_a_run_with_the_trades_term_trains_and_logs_it(tmp_path):
    summary = train(tiny_config(tmp_path, "adv.enabled=true", "adv.trades_beta=6",
                                "train.max_steps=3"))
    assert summary["finished"]
    records = (tmp_path / "metrics.jsonl").read_text()
    assert '"trades_kl"' in records
    assert isinstance(build_objective(tiny_config(tmp_path, "adv.enabled=true"), 10,
                                      torch.device("cpu")), CrossEntropy)


@pytest.mark.parametrize("overrides, message", [
    (["adv.trades_beta=6"], "needs adv.enabled=true"),
    (["adv.trades_beta=6", "adv.enabled=true", "distill.enabled=true"], "choose one"),
])
def test_the_trades_term_without_an_adversarial_view_is_refused_in_one_sentence(overrides,
                                                                                 message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
