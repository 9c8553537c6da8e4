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

from .validation import check_gate, check_input, check_pool_types

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
}


def pool(x: Tensor, kind: str) -> Tensor:
    """Pool ``x: (B, C, *spatial)`` over its spatial dims with one pool type -> ``(B, C)``."""
    (kind,) = check_pool_types((kind,))
    return _POOLS[kind](x, tuple(range(2, x.dim())))


def channel_attention_map(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    fc1_bias: Tensor | None = None,
    fc2_bias: Tensor | None = None,
    *,
    pool_types: Sequence[str] = ("avg", "max"),
    gate_kind: str = "sigmoid",
) -> Tensor:
    """Channel gate ``Mc = gate(sum_p MLP(pool_p(x)))`` for ``x: (B, C, *spatial)`` -> ``(B, C, 1, ...)``."""
    check_input(x, "cbam.functional.channel_attention_map", channels=fc1_weight.shape[1])
    spatial = tuple(range(2, x.dim()))
    pooled = torch.stack([_POOLS[kind](x, spatial) for kind in check_pool_types(pool_types)])  # (P, B, C)
    hidden = F.relu(F.linear(pooled, fc1_weight, fc1_bias))
    logits = F.linear(hidden, fc2_weight, fc2_bias).sum(0)  # (B, C)
    return gate(logits, gate_kind).view(*logits.shape, *([1] * (x.dim() - 2)))


def spatial_pool(x: Tensor) -> Tensor:
    """Channel-wise mean and max of ``x: (B, C, *spatial)`` -> ``(B, 2, *spatial)``, mean first."""
    return torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)


def spatial_attention_map(
    x: Tensor, conv_weight: Tensor, *, norm: Norm | None = None, gate_kind: str = "sigmoid"
) -> Tensor:
    """Spatial gate ``Ms = gate(norm(conv([mean_c x, max_c x])))`` -> ``(B, 1, *spatial)``."""
    dims = conv_weight.dim() - 2
    check_input(x, "cbam.functional.spatial_attention_map", dims=dims)
    logits = _CONVS[dims](spatial_pool(x), conv_weight, padding=conv_weight.shape[-1] // 2)
    if norm is not None:
        logits = norm(logits)
    return gate(logits, gate_kind)


def channel_attention(x: Tensor, *args, **kwargs) -> Tensor:
    """``x * channel_attention_map(x, ...)``: same arguments, output shaped like ``x``."""
    return x * channel_attention_map(x, *args, **kwargs)


def spatial_attention(x: Tensor, *args, **kwargs) -> Tensor:
    """``x * spatial_attention_map(x, ...)``: same arguments, output shaped like ``x``."""
    return x * spatial_attention_map(x, *args, **kwargs)


def cbam(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    conv_weight: Tensor,
    fc1_bias: Tensor | None = None,
    fc2_bias: Tensor | None = None,
    *,
    pool_types: Sequence[str] = ("avg", "max"),
    norm: Norm | None = None,
    gate_kind: str = "sigmoid",
) -> Tensor:
    """CBAM as in the paper: ``y = x * Mc(x)``, then ``y * Ms(y)``; output shaped like ``x``."""
    y = channel_attention(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, pool_types=pool_types, gate_kind=gate_kind)
    return spatial_attention(y, conv_weight, norm=norm, gate_kind=gate_kind)
