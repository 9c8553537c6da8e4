"""The compiled engine for the fused CBAM on the CPU: ``cpu_passes.cpp``, built on first use.

``engine()`` returns the compiled module — the same functions as ``torch_ops`` for contiguous
float32/float64 CPU tensors — or ``None`` when it cannot be had (no C++ compiler, no ninja, a
failed build, or ``CBAM_NO_EXTENSION=1``); the fused path then runs ``torch_ops``. The first
fused call on a machine builds it (about 30 s on 2 cores, silently); torch caches the build in
``TORCH_EXTENSIONS_DIR`` and later processes load it in a second.

Its large outputs (the CBAM output, the input gradient) come from ``output_cache.cpp``: blocks freed
by earlier outputs are reused instead of fresh pages (which the kernel zeroes on first touch). Up to
``CBAM_OUTPUT_CACHE_MB`` (default 256) of freed blocks wait for reuse; ``empty_cache()`` frees them.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

SOURCES = [str(Path(__file__).with_name(name)) for name in ("cpu_passes.cpp", "output_cache.cpp")]

FLAGS = [  # -fopenmp: at::parallel_for uses torch's OpenMP runtime; the math flags let reductions vectorise
    "-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
    "-fno-signed-zeros",
]


def cache_limit_bytes() -> int:
    """``CBAM_OUTPUT_CACHE_MB`` (default 256) in bytes."""
    text = os.environ.get("CBAM_OUTPUT_CACHE_MB", "256")
    if not text.strip().isdigit():
        raise ValueError(f"CBAM_OUTPUT_CACHE_MB must be a whole number of megabytes, got {text!r}")
    return int(text) << 20


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

        module = cpp_extension.load(name="cbam_cpu_passes", sources=SOURCES, extra_cflags=FLAGS,
                                    extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, say so once
        warnings.warn(f"cbam: the fused CPU kernels are unavailable ({str(error).splitlines()[0]}); "
                      "using plain torch ops", RuntimeWarning, stacklevel=2)
        return None
    finally:
        quiet.setLevel(level)
    module.set_output_cache_limit(cache_limit_bytes())
    return module


def cached_bytes() -> int:
    """Bytes of freed output blocks held for reuse."""
    module = engine()
    return 0 if module is None else module.output_cache_bytes()


def empty_cache() -> None:
    """Free the output blocks held for reuse (they are also bounded by ``CBAM_OUTPUT_CACHE_MB``)."""
    module = engine()
    if module is not None:
        module.set_output_cache_limit(0)
        module.set_output_cache_limit(cache_limit_bytes())
