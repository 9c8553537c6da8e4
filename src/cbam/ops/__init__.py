"""Implementations behind ``CBAM(impl=...)``: ``"reference"`` (the eager ``cbam.functional``
composition) and ``"fused"`` (``FusedCBAM``, a hand-derived autograd.Function). ``"auto"`` picks the
fused one wherever it computes the same function: see ``fused_applies``."""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import FusedCBAM, FusedSpec, folds_input_norm, fused_cbam

IMPLS = ("auto", "reference", "fused")
FUSED_DTYPES = (torch.float32, torch.float64)


def fused_applies(impl: str, order: str, x: Tensor) -> bool:
    """Whether a CBAM with this ``impl`` and ``order`` runs the fused path on ``x``.

    ``"auto"`` takes it for channel-first CBAM on float32/float64 input, except while tracing,
    compiling or exporting (those see the reference's plain ops) and under autocast (the reference
    runs each op in autocast's dtype; the fused path computes in the input's dtype).
    """
    if impl != "auto":
        return impl == "fused"
    return (
        order == "channel-spatial"
        and x.dtype in FUSED_DTYPES
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
    )


__all__ = ["IMPLS", "FusedCBAM", "FusedSpec", "folds_input_norm", "fused_applies", "fused_cbam"]
