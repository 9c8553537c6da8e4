"""Figures of captured attention: spatial maps over the input image, channel weights per layer.

Built on ``matplotlib.figure.Figure`` directly, never ``pyplot``: no backend is selected and no global
state is touched, so it runs headless (Agg renders on save) and leaves a user's matplotlib set-up as
it was. matplotlib is imported when a figure is drawn, not when ``cbam.viz`` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

from ..validation import check_int
from .capture import AttentionRecord, select_layers
from .extras import require
from .upsample import upsample_maps


def _pixels(image: Tensor) -> np.ndarray:
    """``image: (3, H, W)`` or ``(1, H, W)`` in [0, 1] -> an ``(H, W, 3)`` or ``(H, W)`` array for ``imshow``."""
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3) or 0 in image.shape:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a tensor (3, H, W) or (1, H, W) with values in [0, 1], got {got}")
    pixels = image.detach().float().cpu().clamp(0, 1)
    return pixels[0].numpy() if image.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()


def _map_2d(heatmap: Tensor) -> Tensor:
    """``(h, w)`` or ``(1, h, w)`` -> ``(h, w)``."""
    if isinstance(heatmap, Tensor) and heatmap.dim() == 3 and heatmap.shape[0] == 1:
        heatmap = heatmap[0]
    if not isinstance(heatmap, Tensor) or heatmap.dim() != 2:
        got = tuple(heatmap.shape) if isinstance(heatmap, Tensor) else type(heatmap).__name__
        raise ValueError(f"a heatmap must be a 2-D map (h, w) or (1, h, w), got {got}")
    return heatmap.detach().float().cpu()


def _finite_range(heatmap: Tensor) -> tuple[float, float]:
    """``(min, max)`` of the finite values of ``heatmap``; ``(0, 0)`` if it has none."""
    finite = heatmap[heatmap.isfinite()]
    return (finite.min().item(), finite.max().item()) if len(finite) else (0.0, 0.0)


def draw_overlay(ax, image: Tensor, heatmap: Tensor, *, cmap: str = "turbo", alpha: float = 0.5) -> None:
    """Draw ``image: (3, H, W)`` in [0, 1] on ``ax`` with ``heatmap: (h, w)`` over it.

    The map is upsampled bilinearly to ``(H, W)`` and min-max scaled over its finite values (a
    constant map draws as 0; NaN stays NaN, drawn transparent), so the colours show where it is high
    relative to itself; ``alpha`` is the overlay's opacity.
    """
    pixels = _pixels(image)
    heat = upsample_maps(_map_2d(heatmap)[None], pixels.shape[:2])[0]
    low, high = _finite_range(heat)
    heat = (heat - low) / (high - low) if high > low else heat.masked_fill(~heat.isnan(), 0)
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=1)
    ax.imshow(heat.numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    ax.set_axis_off()


def draw_channel_weights(ax, weights: Tensor) -> None:
    """Draw one image's channel weights ``(C,)`` on ``ax`` as bars sorted from high to low, on a 0..1 axis.

    A flat profile means the channel gate treats every channel alike; a steep one, that it picks a few.
    """
    if not isinstance(weights, Tensor) or weights.dim() != 1 or len(weights) == 0:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"channel weights must be a non-empty 1-D tensor (C,), got {got}")
    values = weights.detach().float().cpu().sort(descending=True).values.numpy()
    ax.stairs(values, np.arange(len(values) + 1), fill=True, color="tab:blue")
    ax.set_xlim(0, len(values))
    ax.set_ylim(0, 1)
    ax.set_xticks([])
    ax.set_yticks([0, 0.5, 1])
    ax.tick_params(labelsize=7)


def _check_records(records: Mapping[str, AttentionRecord], index: int) -> None:
    if not records:
        raise ValueError("no attention records to draw: run the model inside capture_attention(model) first")
    for name, record in records.items():
        if record.spatial.dim() != 4:
            raise ValueError(f"figures draw 2-D attention; {name!r} has spatial maps of shape "
                             f"{tuple(record.spatial.shape)}, expected (B, 1, H, W)")
        if index >= len(record.spatial):
            raise ValueError(f"index must be < {len(record.spatial)} (the batch size of {name!r}), got {index}")


def attention_figure(
    image: Tensor,
    records: Mapping[str, AttentionRecord],
    *,
    index: int = 0,
    layers: Sequence[str] | None = None,
    heatmaps: Mapping[str, Tensor] | None = None,
    columns: int = 6,
    cmap: str = "turbo",
    alpha: float = 0.5,
):
    """One figure of everything captured for image ``index`` of the batch; returns a matplotlib ``Figure``.

    Top: ``image: (3, H, W)`` in [0, 1] (the un-normalised input), each of ``heatmaps`` (named extra
    ``(h, w)`` maps, e.g. ``{"Grad-CAM layer4": cam}``) and each layer's spatial map over it (see
    ``draw_overlay``; the map's range is under its name). Bottom: each layer's channel weights,
    sorted (see ``draw_channel_weights``). ``records``: what ``capture_attention`` yielded;
    ``layers``: names or prefixes to keep (``select_layers``); ``columns``: panels per row. Save it
    with ``save_figure``.
    """
    figure_class = require("matplotlib.figure").Figure
    pixels = _pixels(image)
    index = check_int("index", index, minimum=0)
    columns = check_int("columns", columns)
    chosen = select_layers(records, layers)
    _check_records(chosen, index)
    overlays = {**(heatmaps or {}), **{name: record.spatial[index] for name, record in chosen.items()}}
    panels = 1 + len(overlays)
    columns = min(columns, panels)
    top_rows, bottom_rows = math.ceil(panels / columns), math.ceil(len(chosen) / columns)
    heights = (2.2 * top_rows + 0.4, 1.5 * bottom_rows + 0.4)
    figure = figure_class(figsize=(2.0 * columns, sum(heights)), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=heights)

    top.suptitle("spatial attention over the input (each map min-max scaled, its range under its name)", fontsize=10)
    axes = top.subplots(top_rows, columns, squeeze=False).ravel()
    axes[0].imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, vmin=0, vmax=1)
    axes[0].set_title("input", fontsize=8)
    axes[0].set_axis_off()
    for ax, (name, heatmap) in zip(axes[1:], overlays.items()):
        heatmap = _map_2d(heatmap)
        draw_overlay(ax, image, heatmap, cmap=cmap, alpha=alpha)
        low, high = _finite_range(heatmap)
        flag = ", has NaN" if heatmap.isnan().any() else ""
        ax.set_title(f"{name}\n{low:.2f} to {high:.2f}{flag}", fontsize=8)
    for ax in axes[panels:]:
        ax.set_axis_off()

    bottom.suptitle("channel attention: each layer's weights, sorted high to low", fontsize=10)
    axes = bottom.subplots(bottom_rows, columns, squeeze=False).ravel()
    for ax, (name, record) in zip(axes, chosen.items()):
        draw_channel_weights(ax, record.channel[index])
        ax.set_title(f"{name} (C = {record.channel.shape[1]})", fontsize=8)
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    return figure
