"""The engines behind the fused CBAM, in one registry, and the one function that picks one for a tensor.

An engine is a module of passes over the large tensor with the functions of ``torch_ops`` (the
portable definition, every other engine tested against it). Each declares what it covers:

========  ============================  ===============================  ==========================
engine    devices                       dtypes                           layouts
========  ============================  ===============================  ==========================
torch     any                           any floating                     any (copies where needed)
cpp       cpu                           float32, float64; bf16, fp16     contiguous, channels-last
                                        on a float32 copy (widened;
                                        bf16: as stored, see below)
triton    cuda (cpu: TRITON_INTERPRET)  float32, float64, bf16, fp16     contiguous, channels-last
========  ============================  ===============================  ==========================

An engine *widens* a dtype it covers only through a copy (``Engine.widens``): the C++ passes read
float32 and float64, so a bfloat16/float16 CPU input (CPU autocast's convs return bfloat16) is
computed on a float32 copy of it, its output cast back (``widened_dtype``, applied by the eager fused
path before it picks an engine; ``select`` itself never widens, so a float16 input that reaches it
runs on ``torch``). Worth its two extra passes: the bfloat16 reference runs its convs, MLP and gates in
bfloat16, which the CPU computes slower than float32 (BENCHMARKS.md, "Thirteenth session"). Where the
C++ one-call forward applies (avg/max/mix pooling, one spatial conv weight), its passes, forward and
backward, read and write bfloat16 as stored instead (``Engine.reads_as_stored``), with float32 arithmetic:
no copies, and half the saved bytes; the forward has the copy's bits, the gradients its values up to
float32 summation order (BENCHMARKS.md, "Fourteenth session").

and which extras it computes itself (``Engine.extras``): ``"forward"`` the whole forward in one call,
``"spatial-logits"`` the spatial conv of one weight on the gated statistics, ``"spatial-norm"`` the
spatial BatchNorm on batch statistics and the gate in one call (``spatial_norm_gate``), ``"spatial-backward"`` the
spatial gate's and conv's backward in one call, ``"fold"`` a BatchNorm before CBAM folded into its
passes. Where an engine lacks one, the fused path does that step in torch ops (or, for the fold,
calls the BatchNorm first). Every engine has the channel MLP forward and backward (``channel_gate``,
``channel_backward``) and the spatial conv's backward by formula (``conv_backward``: the torch
engine's where it has none of its own), so that the backward runs without autograd inside a
``torch.library`` op.

``CBAM_ENGINE`` (``auto``, ``torch``, ``cpp``, ``triton``) picks the engine. ``auto`` takes the
compiled engine of the input's device (``cpp`` on the CPU, ``triton`` on CUDA) where it covers the
input and loads, else ``torch``; a named engine runs wherever it covers the input and loads, and
``torch`` elsewhere (so a test suite run with ``CBAM_ENGINE=triton`` still runs its float64 CPU
checks). The Triton interpreter counts as a CPU device only when ``triton`` is named.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

CHOICES = ("auto", "torch", "cpp", "triton")
HALF_DTYPES = frozenset({torch.bfloat16, torch.float16})
WIDE_DTYPES = frozenset({torch.float32, torch.float64})


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_channels_last_view(x: Tensor) -> bool:
    """Whether ``x: (B, C, *spatial)`` lies channels-last and dense in memory: its ``(B, C, S)`` view has
    strides ``(S * C, 1, C)`` (a batch of one any first stride)."""
    if x.dim() < 3 or x.shape[1] == 1:
        return False
    try:
        flat = x.view(*x.shape[:2], -1)
    except (RuntimeError, ValueError):  # strides that do not flatten (fake tensors raise ValueError)
        return False
    batch, channels, positions = flat.shape
    return (flat.stride(1) == 1 and (positions == 1 or flat.stride(2) == channels)
            and (batch == 1 or flat.stride(0) == channels * positions))


@dataclass(frozen=True)
class Engine:
    """One engine: its name, what inputs it covers, what it computes beyond the passes, and how to load it."""

    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    channels_last: bool
    extras: frozenset[str]
    module_name: str
    loader: Callable[[ModuleType], ModuleType | None] = lambda module: module
    widens: frozenset[torch.dtype] = frozenset()  # dtypes computed on a float32 copy of the input
    reads_as_stored: frozenset[torch.dtype] = frozenset()  # of those, read as stored where its one-call forward is

    def covers(self, x: Tensor, named: bool = False, widened: bool = True) -> bool:
        """Whether this engine computes the fused CBAM of ``x`` (``named``: ``CBAM_ENGINE`` asked for it;
        ``widened``: counting the dtypes it computes only on a float32 copy, not just those it reads as stored)."""
        device = x.device.type
        on_device = device in self.devices or (named and self.name == "triton" and device == "cpu"
                                               and _triton_interpreted())
        as_it_is = x.dtype in self.dtypes or x.dtype in self.reads_as_stored
        if not on_device or not (as_it_is or (widened and x.dtype in self.widens)):
            return False
        return x.is_contiguous() or (self.channels_last and is_channels_last_view(x))

    def load(self) -> ModuleType | None:
        """The engine's module of passes, or ``None`` where it cannot be had (a failed build, no triton)."""
        module = _imported(self.module_name)
        return None if module is None else self.loader(module)

    def has(self, extra: str) -> bool:
        return extra in self.extras


@functools.cache
def _imported(module_name: str) -> ModuleType | None:
    """The engine module ``module_name`` (relative to this package), imported once; ``None`` where it
    cannot be (no triton)."""
    try:
        return importlib.import_module(module_name, __name__)
    except ImportError:
        return None


ENGINES = {
    "torch": Engine("torch", frozenset({"cpu", "cuda", "mps", "xpu", "meta"}), WIDE_DTYPES | HALF_DTYPES, True,
                    frozenset({"fold"}), ".torch_ops"),
    "cpp": Engine("cpp", frozenset({"cpu"}), WIDE_DTYPES, True, frozenset({"forward", "spatial-backward", "fold"}),
                  ".cpp", lambda module: module.engine(), widens=HALF_DTYPES,
                  reads_as_stored=frozenset({torch.bfloat16})),
    "triton": Engine("triton", frozenset({"cuda"}), WIDE_DTYPES | HALF_DTYPES, True,
                     frozenset({"spatial-logits", "spatial-norm", "spatial-backward", "fold"}), ".triton_ops"),
}
AUTO = {"cpu": ("cpp",), "cuda": ("triton",)}  # the compiled engine tried first on each device


def requested() -> str:
    """``CBAM_ENGINE``, checked (default ``auto``)."""
    wanted = os.environ.get("CBAM_ENGINE", "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise ValueError(f"CBAM_ENGINE must be one of {', '.join(CHOICES)}, got {wanted!r}")
    return wanted


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """Run the block with ``CBAM_ENGINE=name`` (tests and benchmarks switch engines this way)."""
    if name not in CHOICES:
        raise ValueError(f"engine must be one of {', '.join(CHOICES)}, got {name!r}")
    before = os.environ.get("CBAM_ENGINE")
    os.environ["CBAM_ENGINE"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["CBAM_ENGINE"]
        else:
            os.environ["CBAM_ENGINE"] = before


def engine_for(x: Tensor, widened: bool = True) -> str:
    """The name of the engine that a fused CBAM of ``x: (B, C, *spatial)`` runs on (see the module docstring;
    ``widened=False``: counting only the dtypes an engine reads as they are). While ``torch.compile`` traces,
    engines are not loaded (an import is no graph op): the name is the one that covers ``x``, and the
    ``torch.library`` op falls back to ``torch`` at run time if it fails to load."""
    wanted = requested()
    candidates = AUTO.get(x.device.type, ()) if wanted == "auto" else (wanted,)
    tracing = torch.compiler.is_compiling()
    for name in candidates:
        engine = ENGINES[name]
        if (name != "torch" and engine.covers(x, named=wanted != "auto", widened=widened)
                and (tracing or engine.load() is not None)):
            return name
    return "torch"


def widened_dtype(x: Tensor) -> torch.dtype | None:
    """float32 where the engine for ``x`` may compute it on a float32 copy (float16 on the C++ engine; bfloat16
    where the fused path does not read it as stored: ``fused._reads_as_stored``), else ``None``."""
    return torch.float32 if x.dtype in ENGINES[engine_for(x)].widens else None


def select(x: Tensor) -> tuple[Engine, ModuleType]:
    """The engine for ``x`` as it is (never widened: see the module docstring; a dtype it reads as stored counts,
    which its callers, the ``torch.library`` ops, take only for the CBAMs the one-call forward covers:
    ``library.covers``) and its module of passes (not while ``torch.compile`` traces)."""
    engine = ENGINES[engine_for(x, widened=False)]
    return engine, engine.load()


__all__ = ["CHOICES", "ENGINES", "Engine", "engine_for", "is_channels_last_view", "requested", "select", "using",
           "widened_dtype"]
