"""CBAM's two forward reductions of ``y = normed(x, input_affine)``, ``x: (B, C, S)``: over positions
(``pool``: each channel's mean, max, first arg-max) and over channels of ``y * mc`` (``gated_stats``).
One launch each; programs loop over the reduced axis, so no atomics and exact indices. Each lane of a
program's tile keeps its own sum, maximum and first arg-max through the loop (element-wise work only: a
reduction across the tile every step made the pooling pass 10x a copy on an H100), reduced once at the end."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import acc_type, affine_at, cdiv, chunk_max, merge_max, reduction_tile, small_outputs, warps
from .launch import launch


@triton.jit
def _pool_kernel(x_ptr, affine_ptr, avg_ptr, peak_ptr, index_ptr, C, S, sxb, sxc, sxs,
                 NORMED: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    if NORMED:
        scale, shift = affine_at(affine_ptr, c, c_in, C, ACC)
        scale, shift = scale[:, None], shift[:, None]
    rows = x_ptr + b * sxb + c[:, None] * sxc
    total = tl.zeros([BLOCK_C, BLOCK_S], ACC)  # per lane of the tile, reduced once after the loop
    best = tl.full([BLOCK_C, BLOCK_S], float("-inf"), ACC)
    at = tl.zeros([BLOCK_C, BLOCK_S], tl.int32)
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)[None, :]
        inside = c_in[:, None] & (s < S)
        y = tl.load(rows + s * sxs, mask=inside, other=0).to(ACC)
        if NORMED:
            y = y * scale + shift
        total += tl.where(inside, y, 0)
        best, at = merge_max(best, at, tl.where(inside, y, float("-inf")), s)
    peak, first = chunk_max(best, at, 1)
    out = b * C + c
    tl.store(avg_ptr + out, tl.sum(total, 1) / S, mask=c_in)
    tl.store(peak_ptr + out, peak, mask=c_in)
    tl.store(index_ptr + out, first.to(tl.int64), mask=c_in)


def pool(x: Tensor, input_affine: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Spatial mean, max and first arg-max of each channel of ``y = normed(x, input_affine)``,
    ``x: (B, C, S)``, ``input_affine (2, C)`` or ``None``: three ``(B, C)`` tensors (int64 indices)."""
    B, C, S = x.shape
    avg, peak = small_outputs(x, (B, C), (B, C))
    index = torch.empty(B, C, dtype=torch.int64, device=x.device)
    block_c, block_s = reduction_tile(x, B, C, S)
    launch(_pool_kernel, (cdiv(C, block_c), B),
        x, input_affine, avg, peak, index, C, S, *x.stride(), NORMED=input_affine is not None, ACC=acc_type(x),
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps(block_c, block_s))
    return avg, peak, index


@triton.jit
def _gated_stats_kernel(x_ptr, mc_ptr, affine_ptr, mean_ptr, peak_ptr, index_ptr, C, S, sxb, sxc, sxs,
                        NORMED: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_in = s < S
    columns = x_ptr + b * sxb + s[None, :] * sxs
    total = tl.zeros([BLOCK_C, BLOCK_S], ACC)  # per lane of the tile, reduced once after the loop
    best = tl.full([BLOCK_C, BLOCK_S], float("-inf"), ACC)
    at = tl.zeros([BLOCK_C, BLOCK_S], tl.int32)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_in = c < C
        inside = c_in[:, None] & s_in[None, :]
        y = tl.load(columns + c[:, None] * sxc, mask=inside, other=0).to(ACC)
        if NORMED:
            scale, shift = affine_at(affine_ptr, c, c_in, C, ACC)
            y = y * scale[:, None] + shift[:, None]
        gated = y * tl.load(mc_ptr + b * C + c, mask=c_in, other=0).to(ACC)[:, None]
        total += tl.where(inside, gated, 0)
        best, at = merge_max(best, at, tl.where(inside, gated, float("-inf")), c[:, None])
    peak, first = chunk_max(best, at, 0)
    out = b * S + s
    tl.store(mean_ptr + out, tl.sum(total, 0) / C, mask=s_in)
    tl.store(peak_ptr + out, peak, mask=s_in)
    tl.store(index_ptr + out, first.to(tl.int64), mask=s_in)


def gated_stats(x: Tensor, mc: Tensor, input_affine: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Channel-wise mean, max and first arg-max of ``y * mc`` at each position, ``y = normed(x,
    input_affine)``, ``x: (B, C, S)``, ``mc (B, C)``: three ``(B, S)`` tensors (int64 indices)."""
    B, C, S = x.shape
    mean, peak = small_outputs(x, (B, S), (B, S))
    index = torch.empty(B, S, dtype=torch.int64, device=x.device)
    block_s, block_c = reduction_tile(x, B, S, C)
    launch(_gated_stats_kernel, (cdiv(S, block_s), B),
        x, mc, input_affine, mean, peak, index, C, S, *x.stride(), NORMED=input_affine is not None,
        ACC=acc_type(x), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps(block_c, block_s))
    return mean, peak, index
