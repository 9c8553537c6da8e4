"""``upsample_maps``: attention or Grad-CAM maps brought to an image's size."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..validation import check_int


def check_image_size(size) -> tuple[int, int]:
    """``size`` as ``(H, W)``: an int (square) or a pair of positive ints."""
    if isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or a pair (H, W), got {size!r}")
        return check_int("image_size[0] (H)", size[0]), check_int("image_size[1] (W)", size[1])
    side = check_int("image_size", size)
    return side, side


def upsample_maps(maps: Tensor, size) -> Tensor:
    """``maps: (B, 1, h, w)`` or ``(B, h, w)`` -> ``(B, H, W)`` float32, bilinear (``align_corners=False``).

    ``size`` is ``(H, W)`` or an int. Bilinear weights are convex, so values stay within the map's
    range (gates stay in (0, 1)) and a constant map stays constant: interpolated in float64, whose
    rounding vanishes in float32 (float32's own left a constant map ~1e-7 uneven, which min-max
    scaling drew as a full-range pattern, and moved the pointing game's peak).
    """
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a tensor (B, 1, h, w) or (B, h, w), got {type(maps).__name__}")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3 or 0 in maps.shape:
        raise ValueError(f"maps must be non-empty 2-D maps (B, 1, h, w) or (B, h, w), got shape {tuple(maps.shape)}")
    up = F.interpolate(maps[:, None].double(), size=check_image_size(size), mode="bilinear", align_corners=False)
    return up[:, 0].float()
