"""The synthetic dataset: one whole shape among shape fragments on a textured background, its box known.

Each ``SIDE x SIDE`` RGB image holds one object of ten kinds (``SHAPES``; the label) at a random
position and scale (18 to 34 pixels), drawn last and fully inside the image, over a background of
colour blotches, a striped texture of random frequency and orientation, and grain. Four distractor
fragments (a shape of any kind cut in half along a random line, 10 to 22 pixels, any colour) lie
under it. Colours are random for the object and the fragments alike, so colour never names the object:
the network has to find the whole shape. ``boxes`` are the object's tight pixel boxes, so where the
network looks can be scored (``cbam.viz.pointing_game``).

Everything is drawn from one ``torch.Generator`` seeded with ``seed``: the same seed gives the same
images on every machine.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_int

SHAPES = ("disk", "ring", "square", "frame", "diamond", "plus", "cross", "triangle", "stripes", "checker")
SIDE = 64
FRAGMENTS = 4
OBJECT_SCALE = (18, 34)  # side of the square the object is drawn in, pixels (inclusive)
FRAGMENT_SCALE = (10, 22)


class SyntheticImages(NamedTuple):
    """``pixels: (N, 3, SIDE, SIDE)`` uint8; ``labels: (N,)`` int64 indices into ``SHAPES``;
    ``boxes: (N, 4)`` int64 ``(x0, y0, x1, y1)``, half-open, the object's tight box."""

    pixels: Tensor
    labels: Tensor
    boxes: Tensor


def shape_mask(kind: int, u: Tensor, v: Tensor) -> Tensor:
    """Shape ``kind`` as a bool mask over coordinates ``u`` (right) and ``v`` (down) in [-1, 1], of one shape."""
    r, m = (u * u + v * v).sqrt(), torch.maximum(u.abs(), v.abs())
    name = SHAPES[kind]
    if name == "disk":
        return r < 0.95
    if name == "ring":
        return (r < 0.95) & (r > 0.55)
    if name == "square":
        return m < 0.8
    if name == "frame":
        return (m < 0.9) & (m > 0.55)
    if name == "diamond":
        return u.abs() + v.abs() < 0.95
    if name == "plus":
        return (torch.minimum(u.abs(), v.abs()) < 0.28) & (m < 0.95)
    if name == "cross":
        return (torch.minimum((u - v).abs(), (u + v).abs()) < 0.38) & (m < 0.8)
    if name == "triangle":
        return (v < 0.8) & (u.abs() < (v + 0.95) * 0.55)
    if name == "stripes":
        return (m < 0.85) & (torch.floor((v + 1) * 2.5).remainder(2) == 0)
    return (m < 0.85) & ((torch.floor((u + 1) * 2) + torch.floor((v + 1) * 2)).remainder(2) == 0)  # checker


def _colour(generator: torch.Generator) -> Tensor:
    """A colour ``(3,)`` whose every channel is far from the background's mid-grey."""
    low = torch.rand(3, generator=generator) * 0.25 + 0.05
    return torch.where(torch.rand(3, generator=generator) < 0.5, low, 1 - low)


def _background(generator: torch.Generator) -> Tensor:
    """Blotches + an oriented sinusoidal texture + grain: ``(3, SIDE, SIDE)`` float32 around 0.5."""
    blotches = F.interpolate(torch.randn(1, 3, 6, 6, generator=generator), size=SIDE, mode="bilinear")[0]
    angle = float(torch.rand(1, generator=generator)) * math.pi
    period = 4 + 8 * float(torch.rand(1, generator=generator))  # pixels
    grid = torch.arange(SIDE, dtype=torch.float32)
    phase = (grid[None, :] * math.cos(angle) + grid[:, None] * math.sin(angle)) * (2 * math.pi / period)
    texture = torch.sin(phase)[None] * (0.06 + 0.06 * torch.rand(3, 1, 1, generator=generator))
    grain = torch.randn(3, SIDE, SIDE, generator=generator)
    return 0.5 + 0.12 * blotches + texture + 0.03 * grain


def _place(generator: torch.Generator, scale: tuple[int, int]) -> tuple[int, int, int]:
    """A side in ``scale`` and a top-left corner that keeps the square inside the image."""
    side = int(torch.randint(scale[0], scale[1] + 1, (1,), generator=generator))
    top, left = torch.randint(0, SIDE - side + 1, (2,), generator=generator).tolist()
    return side, top, left


def _square_coordinates(side: int) -> tuple[Tensor, Tensor]:
    """``u, v: (side, side)`` at the pixel centres of a ``side``-pixel square, spanning [-1, 1]."""
    axis = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
    return axis[None, :].expand(side, side), axis[:, None].expand(side, side)


def _paint(image: Tensor, mask: Tensor, colour: Tensor, top: int, left: int, alpha: float) -> None:
    side = mask.shape[0]
    patch = image[:, top:top + side, left:left + side]
    patch.lerp_(colour[:, None, None].expand_as(patch), alpha * mask.float())


def make_synthetic(count: int, seed: int = 0) -> SyntheticImages:
    """``count`` images drawn from ``seed`` (see the module docstring), as ``SyntheticImages``."""
    count, seed = check_int("count", count), check_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.empty(count, 3, SIDE, SIDE, dtype=torch.uint8)
    labels = torch.randint(0, len(SHAPES), (count,), generator=generator)
    boxes = torch.empty(count, 4, dtype=torch.int64)
    for index in range(count):
        image = _background(generator)
        for _ in range(FRAGMENTS):
            kind = int(torch.randint(0, len(SHAPES), (1,), generator=generator))
            side, top, left = _place(generator, FRAGMENT_SCALE)
            u, v = _square_coordinates(side)
            angle = float(torch.rand(1, generator=generator)) * 2 * math.pi
            half = u * math.cos(angle) + v * math.sin(angle) > 0
            _paint(image, shape_mask(kind, u, v) & half, _colour(generator), top, left, 0.85)
        side, top, left = _place(generator, OBJECT_SCALE)
        mask = shape_mask(int(labels[index]), *_square_coordinates(side))
        _paint(image, mask, _colour(generator), top, left, 1.0)
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        boxes[index] = torch.tensor([left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1])
        pixels[index] = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return SyntheticImages(pixels, labels, boxes)
