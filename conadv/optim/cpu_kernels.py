"""conadv's fused CPU kernels, compiled on first use with torch's C++ extension builder (needs a
C++ compiler and ninja) and cached in torch's extension directory. Optional: when a build is
impossible the optimizers fall back to their foreach path, with one warning."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lamb_cpu.cpp")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def lamb_kernel() -> ModuleType | None:
    """The compiled module, or None (logged once) when it cannot be built here."""
    avx2 = {"avx2", "fma"} <= _cpu_flags()
    # The AVX2 build gets its own name, so a cache shared across machines never hands it to a
    # CPU without AVX2.
    name = "conadv_lamb_cpu" + ("_avx2" if avx2 else "")
    flags = ["-O3", "-fopenmp", "-fno-math-errno"] + (["-mavx2", "-mfma"] if avx2 else [])
    try:
        from torch.utils.cpp_extension import load

        return load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as err:  # no compiler, no ninja, read-only cache...
        log.warning("the fused CPU LAMB kernel could not be built (%s: %s); using the foreach "
                    "path", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None
