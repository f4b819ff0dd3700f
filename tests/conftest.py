import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on two cores: one thread each, as the processes the
    # tests start (OMP_NUM_THREADS=1), instead of four threads fighting over two cores
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            # one worker owns the one-node Slurm cluster the fixture starts
            item.add_marker(pytest.mark.xdist_group("slurm"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
