"""Implementations behind ``CBAM(impl=...)``: ``"reference"`` (the eager ``cbam.functional``
composition) and ``"fused"`` (``FusedCBAM``, a hand-derived autograd.Function over the passes of one
of the engines in ``cbam.ops.engines``). ``"auto"`` picks the fused one wherever a compiled engine
computes it: see ``fused_applies``; ``engine_for(x)`` names the engine an input would run on."""

from __future__ import annotations

import torch
from torch import Tensor

from .engines import engine_for, requested
from .fused import CbamWeights, FusedCBAM, FusedSpec, compute_dtype, folds_input_norm, fused_cbam

IMPLS = ("auto", "reference", "fused")
# The devices where "auto" keeps the fused op under torch.compile. Not the CPU: there inductor's own code for
# the reference, compiled with the network, measured faster in inference than the op (ResNet-50; BENCHMARKS.md).
COMPILED_OP_DEVICES = frozenset({"cuda"})


def fused_applies(impl: str, order: str, x: Tensor) -> bool:
    """Whether a CBAM with this ``impl`` and ``order`` runs the fused path on ``x``.

    ``"auto"`` takes it for channel-first CBAM where a compiled engine covers ``x`` (``engine_for``
    names ``cpp`` or ``triton``; or ``CBAM_ENGINE=torch`` asks for the plain-torch passes), under
    autocast too (the gates then compute in float32 and the output keeps ``x``'s dtype) and under
    ``torch.compile`` on CUDA (``COMPILED_OP_DEVICES``: through the ``torch.library`` ops, where they cover
    the module: see ``CBAM.fuses``). Not under ``torch.compile`` on the CPU: there inductor compiles the
    reference with the network into code that measured faster in inference than the op. Nor while
    tracing with ``torch.jit`` or exporting with ``torch.export`` (ONNX and other exporters see the
    reference's standard ops), nor inside a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``:
    per-sample gradients), which the fused autograd function cannot enter.
    """
    if impl != "auto":
        return impl == "fused"
    if order != "channel-spatial" or not x.is_floating_point() or torch.jit.is_tracing():
        return False
    if torch.compiler.is_compiling():  # the op picks its engine when it runs; exports see the reference's ops
        return not _exporting() and x.device.type in COMPILED_OP_DEVICES
    return not _transformed() and (engine_for(x) != "torch" or requested() == "torch")


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


__all__ = ["COMPILED_OP_DEVICES", "IMPLS", "CbamWeights", "FusedCBAM", "FusedSpec", "compute_dtype", "engine_for",
           "folds_input_norm", "fused_applies", "fused_cbam"]
