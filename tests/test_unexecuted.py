"""The unexecuted-line list's tool (tests/unexecuted.py): each line gets the reason of the
branch it sits in, and a written list reads back as what was written."""

from pathlib import Path

from tests import unexecuted
from tests.unexecuted import CUDA, GAP, NVJPEG, Line, classify, listed, render

SOURCE = '''\
def step(device, mixed):
    if device.type == "cuda":
        record()
    else:
        host()
    if device.type != "cuda":
        plain()
    else:
        launch()
    if mixed:
        decode()
    return rare()
'''


def test_each_line_gets_the_reason_of_its_branch(tmp_path, monkeypatch):
    monkeypatch.setattr(unexecuted, "REPO", tmp_path)
    path = tmp_path / "module.py"
    path.write_text(SOURCE)
    reasons = {line.text: line.reason for line in classify(path, {3, 5, 7, 9, 11, 12})}
    assert reasons == {"record()": CUDA, "host()": GAP, "plain()": GAP, "launch()": CUDA,
                       "decode()": NVJPEG, "return rare()": GAP}
    assert {line.scope for line in classify(path, {3})} == {"step"}


def test_a_written_list_reads_back_line_for_line():
    lines = [Line(CUDA, "conadv/a.py", "f", "x = 1"), Line(GAP, "conadv/a.py", "g", "return"),
             Line(GAP, "conadv/a.py", "g", "return")]  # the same text twice in one function
    entries = listed(render(lines, statements=100, executed=97))
    assert entries.total() == 3 and entries[(GAP, "conadv/a.py", "- `g`: `return`")] == 2


def test_the_written_list_names_files_that_exist():
    """Every file the committed list names is still in the package (a renamed module must
    leave the list, whatever the last measurement said)."""
    repo = Path(unexecuted.REPO)
    paths = {path for _, path, _ in listed(unexecuted.DOC.read_text())}
    assert paths and all((repo / path).is_file() for path in paths), paths
