"""Implementations behind ``CBAM(impl=...)``: ``"reference"`` (the eager ``cbam.functional``
composition) and ``"fused"`` (``FusedCBAM``, a hand-derived autograd.Function over the passes of one
of the engines in ``cbam.ops.engines``). ``"auto"`` picks the fused one wherever a compiled engine
computes it: see ``fused_applies``; ``engine_for(x)`` names the engine an input would run on."""

from __future__ import annotations

import torch
from torch import Tensor

from .engines import ENGINES, engine_for, requested
from .fused import CbamWeights, FusedCBAM, FusedSpec, compute_dtype, folds_input_norm, fused_cbam

IMPLS = ("auto", "reference", "fused")
# Where "auto" keeps the fused op under torch.compile (and a compiled engine covers the input): on these devices
# always, on the training ones where a gradient is recorded. On the CPU the op won in training and lost in inference
# to inductor's own code for the reference (compiled ResNet-50, overhead over the compiled plain network: op +2.8%
# against +13.7% in training, +9.2% against +6.2% in inference; BENCHMARKS.md).
COMPILED_OP_DEVICES = frozenset({"cuda"})
COMPILED_TRAINING_OP_DEVICES = frozenset({"cpu"})


def fused_applies(impl: str, order: str, x: Tensor) -> bool:
    """Whether a CBAM with this ``impl`` and ``order`` runs the fused path on ``x``.

    ``"auto"`` takes it for channel-first CBAM where a compiled engine covers ``x`` (``engine_for``
    names ``cpp`` or ``triton``; or ``CBAM_ENGINE=torch`` asks for the plain-torch passes), under
    autocast too (the gates then compute in float32 and the output keeps ``x``'s dtype) and under
    ``torch.compile`` on CUDA, and on the CPU where a gradient of ``x`` is recorded (``COMPILED_OP_DEVICES``,
    ``COMPILED_TRAINING_OP_DEVICES``: through the ``torch.library`` ops, where they cover the module: see
    ``CBAM.fuses``; elsewhere inductor compiles the reference with the network; nor for an input an engine
    computes only on a widened copy, float16 on the CPU: the op reads it as it is, as the C++ engine reads
    bfloat16). Not while tracing with
    ``torch.jit`` or exporting with ``torch.export`` (ONNX and other exporters see the reference's standard ops),
    nor inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``: per-sample gradients), which the fused
    autograd function cannot enter: there ``"fused"`` runs the reference too, everywhere else the fused path.
    """
    if impl == "reference" or torch.jit.is_tracing() or (not torch.compiler.is_compiling() and _transformed()):
        return False
    if impl == "fused":
        return True
    if order != "channel-spatial" or not x.is_floating_point():
        return False
    engine = ENGINES[engine_for(x)]  # not loaded while compiling: see engine_for
    compiled_engine = engine.name != "torch" or requested() == "torch"
    if torch.compiler.is_compiling():  # the op picks its engine when it runs; exports see the reference's ops
        devices = COMPILED_OP_DEVICES | (COMPILED_TRAINING_OP_DEVICES if _recorded(x) else frozenset())
        # the op reads x as it is: inductor compiles the reference where the engine would widen it
        widened = x.dtype in engine.widens and x.dtype not in engine.reads_as_stored
        return not _exporting() and x.device.type in devices and compiled_engine and not widened
    return compiled_engine


def _recorded(x: Tensor) -> bool:
    """Whether autograd records a gradient of ``x`` here (in a network in training: every conv output)."""
    return torch.is_grad_enabled() and x.requires_grad


def _transformed() -> bool:
    """Whether a ``torch.func`` transform is running (torch has no public question for it; read where present)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is not None and bool(active())


def _exporting() -> bool:
    """``torch.compiler.is_exporting()``, read so that ``torch.compile`` sees its value: dynamo in torch 2.11
    (what the GPU machines have) folds the call to ``True`` under any compile, which made ``auto`` run
    the reference in every compiled model there. The flag it returns is read as a value instead."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


__all__ = ["COMPILED_OP_DEVICES", "COMPILED_TRAINING_OP_DEVICES", "IMPLS", "CbamWeights", "FusedCBAM", "FusedSpec",
           "compute_dtype", "engine_for", "folds_input_norm", "fused_applies", "fused_cbam"]
