"""The compiled engine for the fused CBAM on the CPU: the C++ passes of this folder, built on first use.

``engine()`` returns the compiled module — the same functions as ``torch_ops`` for contiguous
float32/float64 CPU tensors, and bfloat16 read and written as stored, computed in float32 — or ``None``
when it cannot be had (no C++ compiler, no ninja, a failed build, or ``CBAM_NO_EXTENSION=1``); the fused
path then runs ``torch_ops``, after one ``RuntimeWarning``. The files: ``passes.h`` declares every pass;
``forward.cpp``, ``backward.cpp``, ``small_steps.cpp`` (the MLP and the spatial conv) and ``batch_norm.cpp``
(the folded BatchNorm) define them over the helpers of ``vector.h``, ``input_norm.h`` and ``small_steps.h``;
``bindings.cpp`` names their arguments for Python.

``build.py`` builds them: the first fused call on a machine (or ``python -m cbam.ops.build``, ahead of
time) compiles them in about a minute, saying so on stderr, into a folder of ``TORCH_EXTENSIONS_DIR``
named after a hash of the sources, the flags and the target ISA; later processes load it in a second.

Its large outputs (the CBAM output, the input gradient) come from ``output_cache.cpp``: blocks freed
by earlier outputs are reused instead of fresh pages (which the kernel zeroes on first touch). Up to
``CBAM_OUTPUT_CACHE_MB`` (default 256) of freed blocks wait for reuse; ``empty_cache()`` frees them.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

from . import build


def cache_limit_bytes() -> int:
    """``CBAM_OUTPUT_CACHE_MB`` (default 256) in bytes."""
    text = os.environ.get("CBAM_OUTPUT_CACHE_MB", "256")
    if not text.strip().isdigit():
        raise ValueError(f"CBAM_OUTPUT_CACHE_MB must be a whole number of megabytes, got {text!r}")
    return int(text) << 20


@functools.cache
def engine() -> ModuleType | None:
    """The compiled passes, built once per process (and once per machine and install, in torch's cache)."""
    if os.environ.get("CBAM_NO_EXTENSION") == "1":
        return None
    try:
        module = build.load().module
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, say so once
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"cbam: the fused CPU kernels are unavailable ({reason}); using plain torch ops",
                      RuntimeWarning, stacklevel=2)
        return None
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
