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


def fused_applies(impl: str, order: str, x: Tensor) -> bool:
    """Whether a CBAM with this ``impl`` and ``order`` runs the fused path on ``x``.

    ``"auto"`` takes it for channel-first CBAM where a compiled engine covers ``x`` (``engine_for``
    names ``cpp`` or ``triton``; or ``CBAM_ENGINE=torch`` asks for the plain-torch passes), under
    autocast too (the gates then compute in float32 and the output keeps ``x``'s dtype), but not
    while tracing or compiling (those see the reference's plain ops).
    """
    if impl != "auto":
        return impl == "fused"
    return (
        order == "channel-spatial"
        and x.is_floating_point()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and (engine_for(x) != "torch" or requested() == "torch")
    )


__all__ = ["IMPLS", "CbamWeights", "FusedCBAM", "FusedSpec", "compute_dtype", "engine_for", "folds_input_norm",
           "fused_applies", "fused_cbam"]
