"""``pointing_game``: does the spatial attention's peak fall on the object? (Zhang et al., ECCV 2016)"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .upsample import check_image_size, upsample_maps


class PointingGame(NamedTuple):
    """``accuracy``: share of hits; ``chance``: mean box area / image area; ``hits: (N,)`` bool per image."""

    accuracy: float
    chance: float
    hits: Tensor


def _check_boxes(boxes, count: int, height: int, width: int) -> Tensor:
    """``boxes`` as a float64 ``(N, 4)`` tensor of in-image, non-empty ``(x0, y0, x1, y1)`` boxes."""
    try:
        boxes = torch.as_tensor(boxes, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"boxes must be numbers shaped (N, 4), got {type(boxes).__name__}") from None
    if boxes.shape != (count, 4):
        raise ValueError(f"boxes must be (N, 4) = ({count}, 4) boxes (x0, y0, x1, y1), one per map; "
                         f"got shape {tuple(boxes.shape)}")
    x0, y0, x1, y1 = boxes.unbind(1)
    bad = ~((0 <= x0) & (x0 < x1) & (x1 <= width) & (0 <= y0) & (y0 < y1) & (y1 <= height))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"boxes[{i}] = {boxes[i].tolist()} must satisfy 0 <= x0 < x1 <= W = {width} and "
                         f"0 <= y0 < y1 <= H = {height}")
    return boxes


def pointing_game(spatial_maps: Tensor, boxes, image_size: int | tuple[int, int]) -> PointingGame:
    """Score spatial attention by where it peaks: a hit when the peak lies in the object's box.

    ``spatial_maps: (N, 1, h, w)`` or ``(N, h, w)`` (e.g. ``records[name].spatial``) are upsampled
    bilinearly to ``image_size`` ``(H, W)`` (or an int for square images), the size of the images
    the boxes refer to; the peak is the first maximum in row-major order (a constant map peaks at
    the top-left pixel). ``boxes: (N, 4)``, one per map, are ``(x0, y0, x1, y1)`` in pixels,
    half-open: pixel ``(row, col)`` is inside when ``x0 <= col < x1`` and ``y0 <= row < y1``.
    ``chance`` is the mean share of the image the boxes cover: the accuracy of a uniformly random peak.
    A map holding NaN has no peak (``argmax`` would pick the NaN): ``ValueError``.
    """
    height, width = check_image_size(image_size)
    maps = upsample_maps(spatial_maps, (height, width))
    broken = maps.flatten(1).isnan().any(1)
    if broken.any():
        raise ValueError(f"spatial_maps[{int(broken.nonzero()[0])}] holds NaN: it has no peak to score")
    boxes = _check_boxes(boxes, len(maps), height, width)
    peaks = maps.flatten(1).argmax(1)
    rows, cols = peaks // width, peaks % width
    x0, y0, x1, y1 = boxes.unbind(1)
    hits = (x0 <= cols) & (cols < x1) & (y0 <= rows) & (rows < y1)
    chance = ((x1 - x0) * (y1 - y0)).mean().item() / (height * width)
    return PointingGame(hits.double().mean().item(), chance, hits)
