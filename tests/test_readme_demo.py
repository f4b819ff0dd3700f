"""tests/readme_demo.py, the check .ci/run runs after `make demo`: it must read the lines
conadv-train prints, and fail on any number but a training time."""

from __future__ import annotations

from conadv.cli.train import describe_result
from tests import readme_demo
from tests.helpers import REPO


def _quoted() -> list[str]:
    return readme_demo.quoted_results((REPO / "README.md").read_text())


def test_the_readme_quotes_one_result_line_per_demo_run_in_conadv_trains_format():
    quoted = _quoted()
    assert len(quoted) == 2 and "ConAdv tau=1" in quoted[0] and "vanilla" in quoted[1]
    printed = describe_result({
        "final_eval": {"top1": 99.44, "top5": 100.0, "fgsm_top1": 95.56, "pgd10_top1": 94.72,
                       "train_top1": 99.72, "train_test_gap": 0.28, "count": 360},
        "steps": 330, "train_time_s": 61.25, "training": "ConAdv tau=1"})
    assert readme_demo.printed_results(f"log line\n{printed}\nreport: x\n") == [printed]
    assert readme_demo.differences([printed], quoted[:1]) == []


def test_an_edited_number_fails_the_check_and_a_training_time_does_not(tmp_path, capsys):
    quoted = _quoted()
    log = tmp_path / "demo.log"
    retimed = [readme_demo.SECONDS.sub("12.5 s, ", line) for line in quoted]
    assert retimed != quoted
    log.write_text("\n".join(["INFO training", retimed[0], "INFO", retimed[1]]))
    assert readme_demo.main(["--check", str(log)]) == 0
    log.write_text("\n".join([quoted[0].replace("PGD10 top-1: ", "PGD10 top-1: 1"),
                              quoted[1]]))
    assert readme_demo.main(["--check", str(log)]) == 1
    assert "run 1: the demo printed" in capsys.readouterr().err
    log.write_text(quoted[0])
    assert readme_demo.main(["--check", str(log)]) == 1
    log.write_text("the demo crashed")
    assert readme_demo.main(["--check", str(log)]) == 1


def test_write_replaces_only_the_block():
    readme = (REPO / "README.md").read_text()
    lines = ["final test top-1: 1.00% top-5: 2.00% (3 images, 4 steps, 5.0 s, vanilla)"]
    written = readme_demo.write(lines, readme)
    assert readme_demo.quoted_results(written) == lines
    before, after = readme.split(readme_demo.BEGIN)[0], readme.split(readme_demo.END)[1]
    assert written.startswith(before) and written.endswith(after)
