"""Memory layouts the fused passes read: a tensor ``(B, C, *spatial)`` laid out channels-last."""

import torch


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t: (B, C, *spatial)`` whose ``(B, C, S)`` view has strides ``(S C, 1, C)`` (``channels_last``
    for 4-D, ``channels_last_3d`` for 5-D, the same order for 3-D), with ``t``'s values."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` as it is (``"contiguous"``) or ``channels_last(t)``."""
    return channels_last(t) if layout == "channels_last" else t
