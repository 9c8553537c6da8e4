"""The backward passes over ``x: (B, C, S)``: the gates' gradients (``gate_grads``), the gated
statistics' gradient for ``mc`` (``stats_grad``) and the input gradient (``input_grad``).

``gate_grads`` sums over both axes: its programs loop over a range of positions for a block of
channels and add their partial sums atomically (one zeroed allocation for all its small outputs);
``stats_grad`` loops over all positions (no atomics); ``input_grad`` is element-wise. Every max
routes its gradient to its single first arg-max, by comparing indices inside the tile (no scatter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import BUSY, acc_type, affine_at, cdiv, elementwise_tile, reduction_tile, small_outputs, warps
from .launch import launch


@triton.jit
def _gate_grads_kernel(grad_ptr, x_ptr, rectified_ptr, through_ptr, mc_ptr, ms_ptr, channel_index_ptr, affine_ptr,
                       centre_ptr, d_ms_ptr, d_mc_ptr, peaks_ptr, gated_ptr, C, S, span,
                       sgb, sgc, sgs, sxb, sxc, sxs, srb, src, srs, stb, stc, sts,
                       RECTIFIED: tl.constexpr, NORMED: tl.constexpr, CENTRED: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    mc = tl.load(mc_ptr + b * C + c, mask=c_in, other=0).to(ACC)
    if NORMED:
        scale, shift = affine_at(affine_ptr, c, c_in, C, ACC)
    if CENTRED:
        centre = tl.load(centre_ptr + c, mask=c_in, other=0).to(ACC)
        gated = tl.zeros([BLOCK_C, BLOCK_S], ACC)
        centred = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    dot = tl.zeros([BLOCK_C, BLOCK_S], ACC)  # per lane, reduced over positions after the loop
    first = tl.program_id(1) * span
    for start in range(first, tl.minimum(first + span, S), BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_in = s < S
        inside = c_in[:, None] & s_in[None, :]
        g = tl.load(grad_ptr + b * sgb + c[:, None] * sgc + s[None, :] * sgs, mask=inside, other=0).to(ACC)
        if RECTIFIED:  # torch's threshold_backward at 0
            r = tl.load(rectified_ptr + b * srb + c[:, None] * src + s[None, :] * srs, mask=inside, other=1)
            g = tl.where(r <= 0, 0, g)
            tl.store(through_ptr + b * stb + c[:, None] * stc + s[None, :] * sts,
                     g.to(through_ptr.dtype.element_ty), mask=inside)
        x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + s[None, :] * sxs, mask=inside, other=0).to(ACC)
        y = x
        if NORMED:
            y = x * scale[:, None] + shift[:, None]
        ms = tl.load(ms_ptr + b * S + s, mask=s_in, other=0).to(ACC)
        gy = g * y
        dot += gy * ms[None, :]
        tl.atomic_add(d_ms_ptr + b * S + s, tl.sum(gy * mc[:, None], 0), mask=s_in, sem="relaxed")
        if CENTRED:
            u = g * ms[None, :]
            gated += u
            centred += u * (x - centre[:, None])
    tl.atomic_add(d_mc_ptr + b * C + c, tl.sum(dot, 1), mask=c_in, sem="relaxed")
    if CENTRED:
        tl.atomic_add(gated_ptr + b * 2 * C + c, tl.sum(gated, 1), mask=c_in, sem="relaxed")
        tl.atomic_add(gated_ptr + b * 2 * C + C + c, tl.sum(centred, 1), mask=c_in, sem="relaxed")
    if tl.program_id(1) == 0:  # y at each row's arg-max, read again
        at = tl.load(channel_index_ptr + b * C + c, mask=c_in, other=0)
        peak = tl.load(x_ptr + b * sxb + c * sxc + at * sxs, mask=c_in, other=0).to(ACC)
        if NORMED:
            peak = peak * scale + shift
        tl.store(peaks_ptr + b * C + c, peak, mask=c_in)


def gate_grads(grad: Tensor, x: Tensor, mc: Tensor, ms: Tensor, rectified: Tensor | None, channel_index: Tensor,
               input_affine: Tensor | None = None, centre: Tensor | None = None):
    """Gradients of ``sum(grad * y * mc * ms)``, ``y = normed(x, input_affine)``, ``x, grad: (B, C, S)``,
    for ``ms (B, S)`` and ``mc (B, C)``; the ``grad`` used (with ``rectified``, the output of a residual
    tail, ``grad`` through that ReLU, written like ``x``; else ``grad`` itself); ``y`` at
    ``channel_index (B, C)``; and with ``centre (C)`` each row's sums of ``grad * ms`` and ``grad * ms
    * (x - centre)`` ``(B, 2, C)`` (else ``None``). Two launches: the zeroed sums, the pass."""
    B, C, S = x.shape
    d_ms, d_mc, peaks, gated = small_outputs(x, (B, S), (B, C), (B, C), (B, 2, C) if centre is not None else (0,),
                                             zero=True)
    through = grad if rectified is None else torch.empty_like(x)
    block_c, block_s = reduction_tile(x, B, C, S)
    chunks = cdiv(S, block_s)
    splits = min(chunks, cdiv(BUSY, B * cdiv(C, block_c))) if x.is_cuda else 1
    span = cdiv(chunks, max(splits, 1)) * block_s
    launch(_gate_grads_kernel, (cdiv(C, block_c), cdiv(S, span), B),
        grad, x, rectified, through, mc, ms, channel_index, input_affine, centre, d_ms, d_mc, peaks, gated, C, S,
        span, *grad.stride(), *x.stride(), *(x if rectified is None else rectified).stride(), *through.stride(),
        RECTIFIED=rectified is not None, NORMED=input_affine is not None, CENTRED=centre is not None,
        ACC=acc_type(x), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps(block_c, block_s))
    return d_ms, d_mc, through, peaks, gated if centre is not None else None


@triton.jit
def _stats_grad_kernel(x_ptr, d_mean_ptr, d_peak_ptr, index_ptr, affine_ptr, centre_ptr, d_mc_ptr, centred_ptr,
                       C, S, sxb, sxc, sxs, NORMED: tl.constexpr, CENTRED: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    if NORMED:
        scale, shift = affine_at(affine_ptr, c, c_in, C, ACC)
        scale, shift = scale[:, None], shift[:, None]
    if CENTRED:
        centre = tl.load(centre_ptr + c, mask=c_in, other=0).to(ACC)[:, None]
        weighted = tl.zeros([BLOCK_C, BLOCK_S], ACC)
        offsets = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    dot = tl.zeros([BLOCK_C, BLOCK_S], ACC)  # per lane, reduced over positions after the loop
    for start in range(0, S, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_in = s < S
        inside = c_in[:, None] & s_in[None, :]
        x = tl.load(x_ptr + b * sxb + c[:, None] * sxc + s[None, :] * sxs, mask=inside, other=0).to(ACC)
        y = x
        if NORMED:
            y = x * scale + shift
        d_mean = tl.load(d_mean_ptr + b * S + s, mask=s_in, other=0).to(ACC)[None, :]
        d_peak = tl.load(d_peak_ptr + b * S + s, mask=s_in, other=0).to(ACC)[None, :]
        at = tl.load(index_ptr + b * S + s, mask=s_in, other=-1)[None, :]
        dot += (d_mean / C + tl.where(at == c[:, None], d_peak, 0)) * y
        if CENTRED:
            offset = tl.where(inside, x - centre, 0)
            weighted += d_mean * offset
            offsets += offset
    tl.store(d_mc_ptr + b * C + c, tl.sum(dot, 1), mask=c_in)
    if CENTRED:
        tl.store(centred_ptr + b * 2 * C + c, tl.sum(weighted, 1), mask=c_in)
        tl.store(centred_ptr + b * 2 * C + C + c, tl.sum(offsets, 1), mask=c_in)


def stats_grad(x: Tensor, d_mean: Tensor, d_peak: Tensor, index: Tensor, input_affine: Tensor | None = None,
               centre: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Gradient for ``mc (B, C)`` of ``gated_stats`` (of ``y = normed(x, input_affine)``, ``x: (B, C,
    S)``) given the gradients ``d_mean``, ``d_peak`` of its mean and peak and its ``index``, all ``(B,
    S)``; with ``centre (C)`` also each row's sums of ``d_mean * (x - centre)`` and ``x - centre`` ``(B,
    2, C)`` (else ``None``). One launch."""
    B, C, S = x.shape
    d_mc, centred = small_outputs(x, (B, C), (B, 2, C) if centre is not None else (0,))
    block_c, block_s = reduction_tile(x, B, C, S)
    launch(_stats_grad_kernel, (cdiv(C, block_c), B),
        x, d_mean, d_peak, index, input_affine, centre, d_mc, centred, C, S, *x.stride(),
        NORMED=input_affine is not None, CENTRED=centre is not None, ACC=acc_type(x), BLOCK_C=block_c,
        BLOCK_S=block_s, num_warps=warps(block_c, block_s))
    return d_mc, centred if centre is not None else None


@triton.jit
def input_grad_tile(grad_ptr, mc_ptr, ms_ptr, d_mean_ptr, d_peak_ptr, index_ptr, d_avg_ptr, d_max_ptr,
                    channel_index_ptr, b, c, s, c_in, s_in, C, S, sgb, sgc, sgs, ACC: tl.constexpr):
    """CBAM's input gradient on the tile of channels ``c`` and positions ``s`` of sample ``b``: through
    the output, the gated statistics and the pooling, each max's share at its arg-max only."""
    inside = c_in[:, None] & s_in[None, :]
    g = tl.load(grad_ptr + b * sgb + c[:, None] * sgc + s[None, :] * sgs, mask=inside, other=0).to(ACC)
    mc = tl.load(mc_ptr + b * C + c, mask=c_in, other=0).to(ACC)[:, None]
    d_avg = tl.load(d_avg_ptr + b * C + c, mask=c_in, other=0).to(ACC)[:, None]
    d_max = tl.load(d_max_ptr + b * C + c, mask=c_in, other=0).to(ACC)[:, None]
    channel_index = tl.load(channel_index_ptr + b * C + c, mask=c_in, other=-1)[:, None]
    ms = tl.load(ms_ptr + b * S + s, mask=s_in, other=0).to(ACC)[None, :]
    d_mean = tl.load(d_mean_ptr + b * S + s, mask=s_in, other=0).to(ACC)[None, :]
    d_peak = tl.load(d_peak_ptr + b * S + s, mask=s_in, other=0).to(ACC)[None, :]
    index = tl.load(index_ptr + b * S + s, mask=s_in, other=-1)[None, :]
    dy = g * mc * ms + mc / C * d_mean + d_avg / S
    dy += tl.where(index == c[:, None], d_peak * mc, 0)
    return dy + tl.where(s[None, :] == channel_index, d_max, 0)


@triton.jit
def _input_grad_kernel(grad_ptr, mc_ptr, ms_ptr, d_mean_ptr, d_peak_ptr, index_ptr, d_avg_ptr, d_max_ptr,
                       channel_index_ptr, dx_ptr, C, S, sgb, sgc, sgs, sdb, sdc, sds, ACC: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_in, s_in = c < C, s < S
    dx = input_grad_tile(grad_ptr, mc_ptr, ms_ptr, d_mean_ptr, d_peak_ptr, index_ptr, d_avg_ptr, d_max_ptr,
                         channel_index_ptr, b, c, s, c_in, s_in, C, S, sgb, sgc, sgs, ACC)
    tl.store(dx_ptr + b * sdb + c[:, None] * sdc + s[None, :] * sds, dx.to(dx_ptr.dtype.element_ty),
             mask=c_in[:, None] & s_in[None, :])


def input_grad(
    grad: Tensor, x: Tensor, mc: Tensor, ms: Tensor,
    d_mean: Tensor, d_peak: Tensor, index: Tensor, d_avg: Tensor, d_max: Tensor, channel_index: Tensor,
) -> Tensor:
    """Gradient for ``x (B, C, S)`` (its dtype and layout) through the output, the gated statistics and
    the pooling: ``d_mean``/``d_peak``/``index`` ``(B, S)`` belong to ``gated_stats``, ``d_avg``/``d_max``/
    ``channel_index`` ``(B, C)`` to ``pool``. One element-wise launch."""
    B, C, S = x.shape
    dx = torch.empty_like(x)
    block_c, block_s = elementwise_tile(C, S)
    launch(_input_grad_kernel, (cdiv(S, block_s), cdiv(C, block_c), B),
        grad, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index, dx, C, S, *grad.stride(), *dx.stride(),
        ACC=acc_type(x), BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps(block_c, block_s))
    return dx
