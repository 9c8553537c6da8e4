"""CBAM's math, written once for 1-D, 2-D and 3-D inputs ``x: (B, C, *spatial)``.

This is the reference every other implementation is tested against. Weights come in as plain
tensors, in the layout of ``cbam.ChannelAttention`` / ``cbam.SpatialAttention``:

- channel MLP: ``fc1_weight (hidden, C)``, ``fc2_weight (C, hidden)``, optional biases
  ``(hidden,)`` / ``(C,)``; the same MLP is applied to every pooled descriptor and the outputs summed;
- spatial conv: ``conv_weight (1, 2, k, ..., k)`` over the channel-wise ``[mean, max]`` maps, padding
  ``k // 2``, no bias; ``norm`` is an optional callable (e.g. an ``nn.BatchNorm2d``) applied to
  its output before the gate.

Pool types (as the official code offers): ``avg`` mean, ``max`` maximum, ``lp`` the L2 norm
``sqrt(sum x**2)`` and ``lse`` ``log(sum exp x)``, all over the spatial dims. Gates: ``sigmoid``
(values in (0, 1)) and ``hard-sigmoid`` (``relu6(z + 3) / 6``, values in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .presets import COMBINES, ORDERS, SPATIAL_POOLS
from .validation import check_choice, check_gate, check_input, check_pool_types, check_spatial_kernels

Norm = Callable[[Tensor], Tensor]

def _hard_sigmoid(z: Tensor) -> Tensor:
    # Not F.hardsigmoid: its CPU backward uses a float32 1/6 even for float64 (relative error ~3e-8).
    return F.relu6(z + 3) / 6


_GATES = {"sigmoid": torch.sigmoid, "hard-sigmoid": _hard_sigmoid}
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def gate(z: Tensor, kind: str = "sigmoid") -> Tensor:
    """Squash attention logits ``z`` into weights with the named gate."""
    return _GATES[check_gate(kind)](z)


_POOLS = {
    "avg": lambda x, dims: x.mean(dims),
    "max": lambda x, dims: x.amax(dims),
    "lp": lambda x, dims: torch.linalg.vector_norm(x, 2, dim=dims),
    "lse": lambda x, dims: torch.logsumexp(x, dim=dims),
    "mix": lambda x, dims: (x.mean(dims) + x.amax(dims)) / 2,
}


def _promotable(t: Tensor) -> Tensor:
    """``t`` as autocast's ``cat``/``stack`` take it. They promote among float32 and the autocast dtype and
    raise on the other half type (float16 ``x`` under bfloat16 autocast): that one is widened to float32,
    exactly, and the MLP or conv after it casts to the autocast dtype as usual."""
    device = t.device.type
    if t.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device) \
            and t.dtype != torch.get_autocast_dtype(device):
        return t.float()
    return t


def pool(x: Tensor, kind: str) -> Tensor:
    """Pool ``x: (B, C, *spatial)`` over its spatial dims with one pool type -> ``(B, C)``."""
    (kind,) = check_pool_types((kind,))
    check_input(x, "cbam.functional.pool")
    return _POOLS[kind](x, tuple(range(2, x.dim())))


def channel_mlp(
    pooled: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    fc1_bias: Tensor | None = None,
    fc2_bias: Tensor | None = None,
    hidden_mask: Tensor | None = None,
) -> Tensor:
    """The shared MLP on each pooled descriptor ``pooled: (P, B, C)``, summed over P -> ``(B, C)``.

    ``hidden_mask (hidden,)`` scales the hidden units after the ReLU (DynamicCBAM's widths).
    """
    hidden = F.relu(F.linear(pooled, fc1_weight, fc1_bias))
    if hidden_mask is not None:
        hidden = hidden * hidden_mask
    return F.linear(hidden, fc2_weight, fc2_bias).sum(0)


def channel_attention_logits(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    fc1_bias: Tensor | None = None,
    fc2_bias: Tensor | None = None,
    *,
    pool_types: Sequence[str] = ("avg", "max"),
    hidden_mask: Tensor | None = None,
) -> Tensor:
    """Channel logits ``sum_p MLP(pool_p(x))`` for ``x: (B, C, *spatial)`` -> ``(B, C, 1, ...)``.

    ``hidden_mask (hidden,)`` scales the MLP's hidden units after the ReLU (DynamicCBAM's widths).
    """
    check_input(x, "cbam.functional.channel_attention_logits", channels=fc1_weight.shape[1])
    spatial = tuple(range(2, x.dim()))
    pooled = torch.stack([_promotable(_POOLS[kind](x, spatial)) for kind in check_pool_types(pool_types)])  # (P, B, C)
    logits = channel_mlp(pooled, fc1_weight, fc2_weight, fc1_bias, fc2_bias, hidden_mask)
    return logits.view(*logits.shape, *([1] * len(spatial)))


def channel_attention_map(x: Tensor, *args, gate_kind: str = "sigmoid", **kwargs) -> Tensor:
    """Channel gate ``Mc = gate(channel_attention_logits(x, ...))`` -> ``(B, C, 1, ...)``."""
    return gate(channel_attention_logits(x, *args, **kwargs), gate_kind)


def spatial_pool(x: Tensor, kind: str = "concat") -> Tensor:
    """Channel-wise mean and max of ``x: (B, C, *spatial)``.

    ``"concat"``: ``(B, 2, *spatial)``, mean first (the paper); ``"mix"``: ``(B, 1, *spatial)``,
    their average (timm's light CBAM).
    """
    check_input(x, "cbam.functional.spatial_pool")
    return spatial_maps(x.mean(1, keepdim=True), x.amax(1, keepdim=True), kind)


def spatial_maps(mean: Tensor, peak: Tensor, kind: str = "concat") -> Tensor:
    """The spatial conv's input from the channel-wise ``mean`` and ``peak``, each ``(B, 1, *spatial)``."""
    if check_choice("spatial pool", kind, SPATIAL_POOLS) == "concat":
        return torch.cat([_promotable(mean), _promotable(peak)], dim=1)
    return (mean + peak) / 2


def spatial_conv(maps: Tensor, conv_weight: Tensor | Sequence[Tensor]) -> Tensor:
    """``maps: (B, 2 or 1, *spatial)`` through one conv weight or a chain, each size-keeping -> ``(B, 1, *spatial)``."""
    for weight in [conv_weight] if isinstance(conv_weight, Tensor) else conv_weight:
        maps = _CONVS[weight.dim() - 2](maps, weight, padding=[size // 2 for size in weight.shape[2:]])
    return maps


def spatial_attention_logits(
    x: Tensor, conv_weight: Tensor | Sequence[Tensor], *, norm: Norm | None = None, pool: str = "concat"
) -> Tensor:
    """Spatial logits ``norm(conv([mean_c x, max_c x]))`` for ``x: (B, C, *spatial)`` -> ``(B, 1, *spatial)``.

    ``conv_weight`` is one ``(1, 2, k, ..., k)`` weight, or a chain applied in order, each padded to
    keep the size: ``[(1, 2, 1, k), (1, 1, k, 1)]`` is the factorised 1xk-then-kx1 conv,
    ``[(1, 2, 1, 1), (1, 1, k, k)]`` the separable pointwise-then-depthwise one. With
    ``pool="mix"`` the first weight takes one input map instead of two.
    """
    owner = "cbam.functional.spatial_attention_logits"
    weights = [conv_weight] if isinstance(conv_weight, Tensor) else conv_weight
    check_spatial_kernels(weights, owner)
    check_input(x, owner, dims=weights[0].dim() - 2)
    logits = spatial_conv(spatial_pool(x, pool), conv_weight)
    return logits if norm is None else norm(logits)


def spatial_attention_map(x: Tensor, *args, gate_kind: str = "sigmoid", **kwargs) -> Tensor:
    """Spatial gate ``Ms = gate(spatial_attention_logits(x, ...))`` -> ``(B, 1, *spatial)``."""
    return gate(spatial_attention_logits(x, *args, **kwargs), gate_kind)


def channel_attention(x: Tensor, *args, **kwargs) -> Tensor:
    """``x * channel_attention_map(x, ...)``: same arguments, output shaped and typed like ``x`` (under CUDA
    autocast the MLP's sum, and so the gate, is float32: the gate is cast, ``x`` is not promoted)."""
    return x * channel_attention_map(x, *args, **kwargs).to(x.dtype)


def spatial_attention(x: Tensor, *args, **kwargs) -> Tensor:
    """``x * spatial_attention_map(x, ...)``: same arguments, output shaped and typed like ``x``."""
    return x * spatial_attention_map(x, *args, **kwargs).to(x.dtype)


def cbam(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    conv_weight: Tensor | Sequence[Tensor],
    fc1_bias: Tensor | None = None,
    fc2_bias: Tensor | None = None,
    *,
    pool_types: Sequence[str] = ("avg", "max"),
    norm: Norm | None = None,
    spatial_pool: str = "concat",
    gate_kind: str = "sigmoid",
    order: str = "channel-spatial",
) -> Tensor:
    """CBAM for ``x: (B, C, *spatial)``; output shaped like ``x``.

    ``order="channel-spatial"`` (the paper's): ``y = x * Mc(x)``, then ``y * Ms(y)``;
    ``"spatial-channel"``: ``y = x * Ms(x)``, then ``y * Mc(y)`` (the paper's arrangement ablation).
    """
    def channel(t):
        return channel_attention(t, fc1_weight, fc2_weight, fc1_bias, fc2_bias, pool_types=pool_types,
                                 gate_kind=gate_kind)

    def spatial(t):
        return spatial_attention(t, conv_weight, norm=norm, pool=spatial_pool, gate_kind=gate_kind)

    if check_choice("order", order, ORDERS) == "channel-spatial":
        return spatial(channel(x))
    return channel(spatial(x))


def parallel_cbam(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    conv_weight: Tensor | Sequence[Tensor],
    fc1_bias: Tensor | None = None,
    fc2_bias: Tensor | None = None,
    *,
    pool_types: Sequence[str] = ("avg", "max"),
    norm: Norm | None = None,
    spatial_pool: str = "concat",
    gate_kind: str = "sigmoid",
    combine: str = "average",
) -> Tensor:
    """Both gates from the same ``x: (B, C, *spatial)``; output shaped and typed like ``x``.

    ``combine="average"`` (the tutorial's): ``(x * Mc(x) + x * Ms(x)) / 2``;
    ``"logits"``: one gate over the summed logits, ``x * gate(a_c + a_s)`` (as in BAM).
    """
    a_c = channel_attention_logits(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, pool_types=pool_types)
    a_s = spatial_attention_logits(x, conv_weight, norm=norm, pool=spatial_pool)
    if check_choice("combine", combine, COMBINES) == "average":
        return (x * gate(a_c, gate_kind).to(x.dtype) + x * gate(a_s, gate_kind).to(x.dtype)) / 2
    return x * gate(a_c + a_s, gate_kind).to(x.dtype)
