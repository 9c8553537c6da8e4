"""A BatchNorm before CBAM folded into its passes: the map of one on running statistics
(``batch_norm_affine``), the statistics of one on the batch's with CBAM's pooling of its output in the
same read of ``x`` (``batch_norm_pool``), and its backward together with CBAM's
(``batch_norm_input_grad``); the C++ engine's semantics, in float32 (float64 for float64 input).

Batch statistics merge per-chunk means and centred sums of squares (Chan et al.'s pairwise update),
chunk by chunk along each row, then row by row along each channel: no cancellation, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    acc_type,
    cdiv,
    chunk_max,
    elementwise_tile,
    merge_max,
    power_of_two,
    reduction_tile,
    small_outputs,
    warps,
)
from .gradients import input_grad_tile
from .launch import launch


@triton.jit
def _affine_kernel(weight_ptr, bias_ptr, mean_ptr, var_ptr, affine_ptr, C, eps, WEIGHT: tl.constexpr,
                   BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    scale = 1 / tl.sqrt(tl.load(var_ptr + c, mask=c_in, other=1).to(ACC) + eps)
    if WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_in, other=1).to(ACC)
    shift = -tl.load(mean_ptr + c, mask=c_in, other=0).to(ACC) * scale
    if BIAS:
        shift += tl.load(bias_ptr + c, mask=c_in, other=0).to(ACC)
    tl.store(affine_ptr + c, scale, mask=c_in)
    tl.store(affine_ptr + C + c, shift, mask=c_in)


def batch_norm_affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """The per-channel map ``(2, C)`` — scale, then shift — of a BatchNorm on the statistics ``mean``,
    ``var (C)``: ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale`` (weight and bias
    optional). One launch."""
    C = mean.numel()
    (affine,) = small_outputs(mean, (2, C))
    block_c = min(1024, power_of_two(C))
    launch(_affine_kernel, (cdiv(C, block_c),),
        weight, bias, mean, var, affine, C, eps, WEIGHT=weight is not None, BIAS=bias is not None,
        ACC=acc_type(mean), BLOCK_C=block_c)
    return affine


@triton.jit
def _row_moments_kernel(x_ptr, rows_ptr, at_ptr, B, C, S, sxb, sxc, sxs, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    """Per row (b, c): mean, centred sum of squares, max, min (``rows (4, B, C)``) and the first
    positions of the max and the min (``at (2, B, C)``)."""
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    row = x_ptr + b * sxb + c[:, None] * sxc
    seen = tl.zeros([BLOCK_C, BLOCK_S], ACC)  # per lane of the tile (Welford), merged after the loop
    lane_mean = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    lane_squares = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    high = tl.full([BLOCK_C, BLOCK_S], float("-inf"), ACC)
    high_at = tl.zeros([BLOCK_C, BLOCK_S], tl.int32)
    low = tl.full([BLOCK_C, BLOCK_S], float("-inf"), ACC)  # the maximum of -x
    low_at = tl.zeros([BLOCK_C, BLOCK_S], tl.int32)
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)[None, :]
        inside = c_in[:, None] & (s < S)
        v = tl.load(row + s * sxs, mask=inside, other=0).to(ACC)
        seen += inside.to(ACC)
        delta = tl.where(inside, v - lane_mean, 0)
        lane_mean += delta / tl.maximum(seen, 1)
        lane_squares += delta * (v - lane_mean)
        high, high_at = merge_max(high, high_at, tl.where(inside, v, float("-inf")), s)
        low, low_at = merge_max(low, low_at, tl.where(inside, -v, float("-inf")), s)
    mean = tl.sum(seen * lane_mean, 1) / tl.maximum(tl.sum(seen, 1), 1)
    apart = lane_mean - mean[:, None]
    squares = tl.sum(lane_squares + seen * apart * apart, 1)
    high, high_at = chunk_max(high, high_at, 1)
    low, low_at = chunk_max(low, low_at, 1)
    out = b * C + c
    plane = B * C
    tl.store(rows_ptr + out, mean, mask=c_in)
    tl.store(rows_ptr + plane + out, squares, mask=c_in)
    tl.store(rows_ptr + 2 * plane + out, high, mask=c_in)
    tl.store(rows_ptr + 3 * plane + out, -low, mask=c_in)
    tl.store(at_ptr + out, high_at, mask=c_in)
    tl.store(at_ptr + plane + out, low_at, mask=c_in)


@triton.jit
def _batch_norm_pool_kernel(rows_ptr, at_ptr, weight_ptr, bias_ptr, avg_ptr, peak_ptr, index_ptr, mean_ptr, var_ptr,
                            invstd_ptr, affine_ptr, B, C, S, eps, WEIGHT: tl.constexpr, BIAS: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel: the rows' statistics merged, the BatchNorm's map, and each row's pooling of the
    map's output from its mean, max and min (the map is monotone)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    plane = B * C
    merged = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    squares = tl.zeros([BLOCK_C], ACC)
    top = tl.full([BLOCK_C], float("-inf"), ACC)  # the channel's maximum and minimum (NaN where it holds one)
    bottom = tl.full([BLOCK_C], float("inf"), ACC)
    for b in range(0, B):  # rows of S values each
        row_mean = tl.load(rows_ptr + b * C + c, mask=c_in, other=0)
        delta = row_mean - mean
        total = merged + 1
        mean += delta / total
        squares += tl.load(rows_ptr + plane + b * C + c, mask=c_in, other=0) + delta * delta * (merged * S / total)
        merged = total
        top = tl.maximum(top, tl.load(rows_ptr + 2 * plane + b * C + c, mask=c_in, other=0),
                         propagate_nan=tl.PropagateNan.ALL)
        bottom = tl.minimum(bottom, tl.load(rows_ptr + 3 * plane + b * C + c, mask=c_in, other=0),
                            propagate_nan=tl.PropagateNan.ALL)
    # a channel holding an infinity: torch's mean (its sum over the count) is that infinity, NaN with both or a
    # NaN; Welford's merges made it NaN (inf - inf)
    mean = tl.where((top == float("inf")) | (bottom == float("-inf")), top + bottom, mean)
    var = squares / (merged * S)
    invstd = 1 / tl.sqrt(var + eps)
    scale = invstd
    if WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_in, other=1).to(ACC)
    shift = -mean * scale
    if BIAS:
        shift += tl.load(bias_ptr + c, mask=c_in, other=0).to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_in)
    tl.store(var_ptr + c, var, mask=c_in)
    tl.store(invstd_ptr + c, invstd, mask=c_in)
    tl.store(affine_ptr + c, scale, mask=c_in)
    tl.store(affine_ptr + C + c, shift, mask=c_in)
    falling = scale < 0
    for b in range(0, B):
        out = b * C + c
        tl.store(avg_ptr + out, scale * tl.load(rows_ptr + out, mask=c_in, other=0) + shift, mask=c_in)
        high = tl.load(rows_ptr + 2 * plane + out, mask=c_in, other=0)
        low = tl.load(rows_ptr + 3 * plane + out, mask=c_in, other=0)
        tl.store(peak_ptr + out, tl.fma(scale, tl.where(falling, low, high), shift), mask=c_in)
        at = tl.where(falling, tl.load(at_ptr + plane + out, mask=c_in, other=0),
                      tl.load(at_ptr + out, mask=c_in, other=0))
        tl.store(index_ptr + out, tl.where(scale == 0, 0, at).to(tl.int64), mask=c_in)


def batch_norm_pool(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> list[Tensor]:
    """A BatchNorm on the batch statistics of ``x3 (B, C, S)`` and CBAM's pooling of its output, in one
    read of ``x3``: ``[avg, peak, index (B, C), mean, var (biased), invstd (C), affine (2, C)]`` with
    ``invstd = 1 / sqrt(var + eps)`` and ``affine`` the map ``(scale, shift)`` of the BatchNorm (weight,
    bias optional). The pooled max and first arg-max come from each row's max, or its min where the
    scale is negative (position 0 where it is 0). Two launches: rows, then channels."""
    B, C, S = x3.shape
    rows, avg, peak, mean, var, invstd, affine = small_outputs(x3, (4, B, C), (B, C), (B, C), (C,), (C,), (C,),
                                                              (2, C))
    at = torch.empty(2, B, C, dtype=torch.int32, device=x3.device)
    index = torch.empty(B, C, dtype=torch.int64, device=x3.device)
    block_c, block_s = reduction_tile(x3, B, C, S)
    launch(_row_moments_kernel, (cdiv(C, block_c), B),
        x3, rows, at, B, C, S, *x3.stride(), ACC=acc_type(x3), BLOCK_C=block_c, BLOCK_S=block_s,
        num_warps=warps(block_c, block_s))
    block_c = min(128, power_of_two(C))
    launch(_batch_norm_pool_kernel, (cdiv(C, block_c),),
        rows, at, weight, bias, avg, peak, index, mean, var, invstd, affine, B, C, S, eps, WEIGHT=weight is not None,
        BIAS=bias is not None, ACC=acc_type(x3), BLOCK_C=block_c)
    return [avg, peak, index, mean, var, invstd, affine]


@triton.jit
def _batch_norm_sums_kernel(x_ptr, mc_ptr, d_mean_ptr, d_peak_ptr, index_ptr, d_avg_ptr, d_max_ptr,
                            channel_index_ptr, gated_ptr, centred_ptr, mean_ptr, sums_ptr, C, S, sxb, sxc, sxs,
                            ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sample ``b``'s share of each channel's sums of ``dy`` and ``dy (x - mean)`` (``sums (2, C)``,
    added atomically), ``dy`` CBAM's input gradient, from the row sums the earlier passes took."""
    b = tl.program_id(0).to(tl.int64)
    sample = x_ptr + b * sxb
    d_mean_sum = tl.zeros([BLOCK_S], ACC)
    for start in range(0, S, BLOCK_S):  # the gated maxima's shares, at their channels
        s = start + tl.arange(0, BLOCK_S)
        s_in = s < S
        d_mean_sum += tl.load(d_mean_ptr + b * S + s, mask=s_in, other=0).to(ACC)
        c = tl.load(index_ptr + b * S + s, mask=s_in, other=0)
        share = tl.load(d_peak_ptr + b * S + s, mask=s_in, other=0).to(ACC)
        share *= tl.load(mc_ptr + b * C + c, mask=s_in, other=0).to(ACC)
        offset = tl.load(sample + c * sxc + s * sxs, mask=s_in, other=0).to(ACC)
        offset -= tl.load(mean_ptr + c, mask=s_in, other=0).to(ACC)
        tl.atomic_add(sums_ptr + c, share, mask=s_in, sem="relaxed")
        tl.atomic_add(sums_ptr + C + c, share * offset, mask=s_in, sem="relaxed")
    d_mean_sum_total = tl.sum(d_mean_sum, 0)
    for start in range(0, C, BLOCK_C):  # the rows' terms
        c = start + tl.arange(0, BLOCK_C)
        c_in = c < C
        row = b * C + c
        mc = tl.load(mc_ptr + row, mask=c_in, other=0).to(ACC)
        d_avg = tl.load(d_avg_ptr + row, mask=c_in, other=0).to(ACC)
        d_max = tl.load(d_max_ptr + row, mask=c_in, other=0).to(ACC)
        at = tl.load(channel_index_ptr + row, mask=c_in, other=0)
        at_offset = tl.load(sample + c * sxc + at * sxs, mask=c_in, other=0).to(ACC)
        at_offset -= tl.load(mean_ptr + c, mask=c_in, other=0).to(ACC)
        pair = b * 2 * C + c
        gated = tl.load(gated_ptr + pair, mask=c_in, other=0).to(ACC)
        gated_moment = tl.load(gated_ptr + pair + C, mask=c_in, other=0).to(ACC)
        weighted = tl.load(centred_ptr + pair, mask=c_in, other=0).to(ACC)
        offsets = tl.load(centred_ptr + pair + C, mask=c_in, other=0).to(ACC)
        plain = mc * gated + mc / C * d_mean_sum_total + d_avg + d_max
        moment = mc * gated_moment + mc / C * weighted + d_avg / S * offsets + d_max * at_offset
        tl.atomic_add(sums_ptr + c, plain, mask=c_in, sem="relaxed")
        tl.atomic_add(sums_ptr + C + c, moment, mask=c_in, sem="relaxed")


@triton.jit
def _batch_norm_input_grad_kernel(grad_ptr, x_ptr, mc_ptr, ms_ptr, d_mean_ptr, d_peak_ptr, index_ptr, d_avg_ptr,
                                  d_max_ptr, channel_index_ptr, sums_ptr, mean_ptr, invstd_ptr, weight_ptr, dx_ptr,
                                  d_weight_ptr, d_bias_ptr, B, C, S, sgb, sgc, sgs, sxb, sxc, sxs, sdb, sdc, sds,
                                  WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
                                  BLOCK_S: tl.constexpr):
    """``dx = a dy + shift + slope (x - mean)`` on one tile, the per-channel coefficients from ``sums``;
    the first tile of each channel block also writes the weight and bias gradients."""
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_in, s_in = c < C, s < S
    plain = tl.load(sums_ptr + c, mask=c_in, other=0)
    moment = tl.load(sums_ptr + C + c, mask=c_in, other=0)
    invstd = tl.load(invstd_ptr + c, mask=c_in, other=0).to(ACC)
    scale = invstd
    if WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_in, other=1).to(ACC)
    count = B * S
    shift = -scale * plain / count
    slope = -scale * invstd * invstd * moment / count
    dy = input_grad_tile(grad_ptr, mc_ptr, ms_ptr, d_mean_ptr, d_peak_ptr, index_ptr, d_avg_ptr, d_max_ptr,
                         channel_index_ptr, b, c, s, c_in, s_in, C, S, sgb, sgc, sgs, ACC)
    inside = c_in[:, None] & s_in[None, :]
    x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + s[None, :] * sxs, mask=inside, other=0).to(ACC)
    centre = tl.load(mean_ptr + c, mask=c_in, other=0).to(ACC)
    dx = scale[:, None] * dy + shift[:, None] + slope[:, None] * (x - centre[:, None])
    tl.store(dx_ptr + b * sdb + c[:, None] * sdc + s[None, :] * sds, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    if (tl.program_id(0) == 0) & (tl.program_id(2) == 0):
        tl.store(d_weight_ptr + c, moment * invstd, mask=c_in)
        tl.store(d_bias_ptr + c, plain, mask=c_in)


def batch_norm_input_grad(
    grad: Tensor, x: Tensor, mc: Tensor, ms: Tensor,
    d_mean: Tensor, d_peak: Tensor, index: Tensor, d_avg: Tensor, d_max: Tensor, channel_index: Tensor,
    gated: Tensor, centred: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``x (B, C, S)`` (its dtype and layout) and the weight and bias ``(C)`` of a BatchNorm
    on batch statistics (``mean``, ``invstd (C)``, ``weight (C)`` or ``None``) whose output is CBAM's
    input: torch's BatchNorm backward of ``input_grad``'s ``dy`` (never written), its per-channel sums
    built from ``gated`` (``gate_grads``) and ``centred`` (``stats_grad``), both ``(B, 2, C)``, plus the
    maxima's shares. Three launches: the zeroed sums, their per-sample shares, the element-wise pass."""
    B, C, S = x.shape
    (sums,) = small_outputs(x, (2, C), zero=True)
    d_weight, d_bias = small_outputs(x, (C,), (C,))
    dx = torch.empty_like(x)
    block_c, block_s = (min(1024, power_of_two(n)) for n in (C, S))
    launch(_batch_norm_sums_kernel, (B,),
        x, mc, d_mean, d_peak, index, d_avg, d_max, channel_index, gated, centred, mean, sums, C, S, *x.stride(),
        ACC=acc_type(x), BLOCK_C=block_c, BLOCK_S=block_s)
    block_c, block_s = elementwise_tile(C, S)
    launch(_batch_norm_input_grad_kernel, (cdiv(S, block_s), cdiv(C, block_c), B),
        grad, x, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index, sums, mean, invstd, weight, dx, d_weight,
        d_bias, B, C, S, *grad.stride(), *x.stride(), *dx.stride(), WEIGHT=weight is not None, ACC=acc_type(x),
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps(block_c, block_s))
    return dx, d_weight, d_bias
