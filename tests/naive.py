"""An independent, deliberately plain CBAM for tests: explicit formulas, no ``torch.nn.functional``.

Pools are written out (sum / count, sqrt of sum of squares, max-shifted log-sum-exp), the MLP is two
matrix products, the spatial conv is a sum of shifted slices of the zero-padded input, and the
BatchNorm and gates are their textbook formulas. Use it in float64.
"""

from __future__ import annotations

import itertools

import torch

POOLS = {
    "avg": lambda flat: flat.sum(-1) / flat.shape[-1],
    "max": lambda flat: flat.max(-1).values,
    "lp": lambda flat: (flat * flat).sum(-1).sqrt(),
    "lse": lambda flat: flat.max(-1).values + (flat - flat.max(-1, keepdim=True).values).exp().sum(-1).log(),
    "mix": lambda flat: (flat.sum(-1) / flat.shape[-1] + flat.max(-1).values) / 2,
}

GATES = {
    "sigmoid": lambda z: 1 / (1 + torch.exp(-z)),
    "hard-sigmoid": lambda z: (z / 6 + 0.5).clamp(0, 1),
}


def channel_logits(x, w1, w2, b1=None, b2=None, pool_types=("avg", "max")):
    """``x: (B, C, *spatial)`` -> channel logits ``(B, C, 1, ...)``."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    logits = 0
    for kind in pool_types:
        hidden = POOLS[kind](flat) @ w1.T + (0 if b1 is None else b1)
        logits = logits + hidden.clamp(min=0) @ w2.T + (0 if b2 is None else b2)
    return logits.reshape(*x.shape[:2], *[1] * (x.dim() - 2))


def channel_map(x, w1, w2, b1=None, b2=None, pool_types=("avg", "max"), gate="sigmoid"):
    """``x: (B, C, *spatial)`` -> channel gate ``(B, C, 1, ...)``."""
    return GATES[gate](channel_logits(x, w1, w2, b1, b2, pool_types))


def conv_same(maps, weight):
    """Zero-padded 'same' cross-correlation of ``maps (B, 2, *s)`` with ``weight (1, 2, k, ..., k)``."""
    k = weight.shape[-1]
    pad = k // 2
    spatial = maps.shape[2:]
    padded = maps.new_zeros(*maps.shape[:2], *(n + 2 * pad for n in spatial))
    padded[(slice(None), slice(None), *(slice(pad, pad + n) for n in spatial))] = maps
    out = maps.new_zeros(maps.shape[0], 1, *spatial)
    for offset in itertools.product(range(k), repeat=len(spatial)):
        window = padded[(slice(None), slice(None), *(slice(o, o + n) for o, n in zip(offset, spatial)))]
        out = out + (window * weight[(0, slice(None), *offset)].reshape(1, -1, *[1] * len(spatial))).sum(
            1, keepdim=True
        )
    return out


def batch_norm_eval(z, mean, var, weight, bias, eps=1e-5):
    return (z - mean) / torch.sqrt(var + eps) * weight + bias


def spatial_logits(x, conv_weight, norm=None, pool="concat"):
    """``x: (B, C, *spatial)`` -> spatial logits ``(B, 1, *spatial)`` from [mean, max] over channels
    (``pool="concat"``: two maps) or their average (``"mix"``: one map)."""
    maps = torch.stack([x.sum(1) / x.shape[1], x.max(1).values], dim=1)
    if pool == "mix":
        maps = maps.sum(1, keepdim=True) / 2
    z = conv_same(maps, conv_weight)
    return z if norm is None else norm(z)


def spatial_map(x, conv_weight, norm=None, gate="sigmoid"):
    """``x: (B, C, *spatial)`` -> spatial gate ``(B, 1, *spatial)``."""
    return GATES[gate](spatial_logits(x, conv_weight, norm))


def cbam(x, fc1_weight, fc2_weight, conv_weight, fc1_bias=None, fc2_bias=None, *,
         pool_types=("avg", "max"), norm=None, gate_kind="sigmoid"):
    """Same signature as ``cbam.functional.cbam``."""
    y = x * channel_map(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, pool_types, gate_kind)
    return y * spatial_map(y, conv_weight, norm, gate_kind)
