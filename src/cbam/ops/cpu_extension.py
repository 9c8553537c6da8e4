"""The compiled engine for the fused CBAM on the CPU: ``cpu_passes.cpp``, built on first use.

``engine()`` returns the compiled module — the same functions as ``torch_passes`` for contiguous
float32/float64 CPU tensors — or ``None`` when it cannot be had (no C++ compiler, no ninja, a
failed build, or ``CBAM_NO_EXTENSION=1``); the fused path then runs ``torch_passes``. The first
fused call on a machine builds it (about 30 s on 2 cores, silently); torch caches the build in
``TORCH_EXTENSIONS_DIR`` and later processes load it in a second.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("cpu_passes.cpp")
FLAGS = [  # -fopenmp: at::parallel_for uses torch's OpenMP runtime; the math flags let reductions vectorise
    "-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
    "-fno-signed-zeros",
]


@functools.cache
def engine() -> ModuleType | None:
    """The compiled passes, built once per process (and once per machine, in torch's cache)."""
    if os.environ.get("CBAM_NO_EXTENSION") == "1":
        return None
    quiet = logging.getLogger("torch.utils.cpp_extension")  # it warns that no CUDA runtime exists
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name="cbam_cpu_passes", sources=[str(SOURCE)], extra_cflags=FLAGS,
                                  extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, say so once
        warnings.warn(f"cbam: the fused CPU kernels are unavailable ({str(error).splitlines()[0]}); "
                      "using plain torch ops", RuntimeWarning, stacklevel=2)
        return None
    finally:
        quiet.setLevel(level)
