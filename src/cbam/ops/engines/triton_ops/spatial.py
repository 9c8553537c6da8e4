"""The spatial gate's small steps on the gated statistics ``mean, speak: (B, S)``, ``S = D*H*W`` for
``size = [D, H, W]``: the conv's logits, and the backward from the gate to the statistics.

The conv weight ``conv_w`` holds ``I * kd * kh * kw`` taps (``(1, I, *kernel)``, ``kernel = [kd, kh,
kw]`` odd): a size-keeping cross-correlation, zero padding ``k // 2``, no bias, of the maps ``[mean,
speak]`` (I = 2) or ``(mean + speak) / 2`` (I = 1). Contiguous float32 or float64 tensors, sums and
outputs in their dtype. Programs cover a tile of one sample's positions and loop over the taps.

Launches: ``spatial_logits`` one (with the gate through a fixed norm, where asked); ``spatial_norm_gate``
(the gate through a BatchNorm on batch statistics, which needs all logits first) one; ``spatial_backward``
two (a zeroed allocation for its atomic sums, the conv's backward, which recomputes the logits'
gradient at each tap's positions instead of storing it), three with a norm (its sums over all logits
in between); for an empty batch only the allocation.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from .common import TILE, acc_type, cdiv, gate, gate_grad, power_of_two, small_outputs, warps
from .launch import launch


@triton.jit
def _neighbour(d, h, w, s_in, a, e, f, D, H, W):
    """Positions ``(d + a, h + e, w + f)`` of a ``D x H x W`` grid, flattened, and where they lie on
    it (and ``s_in``)."""
    d, h, w = d + a, h + e, w + f
    inside = s_in & (d >= 0) & (d < D) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    return (d * H + h) * W + w, inside


@triton.jit
def _spatial_logits_kernel(mean_ptr, speak_ptr, w_ptr, out_ptr, ms_ptr, norm_w_ptr, norm_b_ptr, running_mean_ptr,
                           running_var_ptr, eps, D, H, W, KD, KH, KW, MAPS: tl.constexpr, FINISH: tl.constexpr,
                           NORM: tl.constexpr, WEIGHT: tl.constexpr, BIAS: tl.constexpr, HARD: tl.constexpr,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
    S = D * H * W
    base = tl.program_id(1).to(tl.int64) * S
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s_in = s < S
    d, h, w = s // (H * W), s // W % H, s % W
    taps = KD * KH * KW
    total = tl.zeros([BLOCK], ACC)
    for a in range(KD):
        for e in range(KH):
            for f in range(KW):
                q, inside = _neighbour(d, h, w, s_in, a - KD // 2, e - KH // 2, f - KW // 2, D, H, W)
                mean = tl.load(mean_ptr + base + q, mask=inside, other=0).to(ACC)
                speak = tl.load(speak_ptr + base + q, mask=inside, other=0).to(ACC)
                t = (a * KH + e) * KW + f
                if MAPS == 2:
                    total += tl.load(w_ptr + t).to(ACC) * mean + tl.load(w_ptr + taps + t).to(ACC) * speak
                else:
                    total += tl.load(w_ptr + t).to(ACC) * ((mean + speak) / 2)
    tl.store(out_ptr + base + s, total, mask=s_in)
    if FINISH:  # the gate through a fixed norm: (z - running mean) / sqrt(running var + eps) * weight + bias
        z = total
        if NORM:
            z = (z - tl.load(running_mean_ptr).to(ACC)) / tl.sqrt(tl.load(running_var_ptr).to(ACC) + eps)
            if WEIGHT:
                z = z * tl.load(norm_w_ptr).to(ACC)
            if BIAS:
                z = z + tl.load(norm_b_ptr).to(ACC)
        tl.store(ms_ptr + base + s, gate(z, HARD), mask=s_in)


def _block(t: Tensor, positions: int) -> int:
    """Positions per program: 256 on a GPU (many programs), a full tile in the interpreter (few)."""
    return min(power_of_two(positions), 256 if t.is_cuda else TILE)


def _maps(conv_w: Tensor, kernel: list[int]) -> int:
    """The maps the conv reads, ``I``."""
    return conv_w.numel() // math.prod(kernel)


def spatial_logits(mean: Tensor, speak: Tensor, conv_w: Tensor, size: list[int], kernel: list[int],
                   finish: bool = False, hard: bool = False, norm_w: Tensor | None = None,
                   norm_b: Tensor | None = None, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, eps: float = 0.0) -> list[Tensor | None]:
    """The conv's logits ``(B, S)`` of ``mean, speak (B, S)`` with ``conv_w (1, I, *kernel)``, ``size``
    and ``kernel`` padded to three dims, and with ``finish`` the gate ``ms (B, S)`` through a fixed norm
    (a BatchNorm's running statistics ``(1,)`` with its optional weight and bias, or none without
    them), else ``None``: ``[logits, ms]``. One launch."""
    B, S = mean.shape
    logits, ms = small_outputs(mean, (B, S), (B, S) if finish else (0,))
    if logits.numel() == 0:
        return [logits, ms if finish else None]
    block = _block(mean, S)
    launch(_spatial_logits_kernel, (cdiv(S, block), B),
        mean, speak, conv_w, logits, ms, norm_w, norm_b, running_mean, running_var, float(eps), *size, *kernel,
        MAPS=_maps(conv_w, kernel), FINISH=finish, NORM=running_mean is not None, WEIGHT=norm_w is not None,
        BIAS=norm_b is not None, HARD=hard, ACC=acc_type(mean), BLOCK=block, num_warps=warps(1, block))
    return [logits, ms if finish else None]


@triton.jit
def _spatial_norm_kernel(logits_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, ms_ptr, N, eps,
                         factor, WEIGHT: tl.constexpr, BIAS: tl.constexpr, RUNNING: tl.constexpr,
                         HARD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the batch mean and variance of all ``N`` logits (sums per lane, shifted by the first
    logit), the gate of their BatchNorm, and the running statistics moved towards them."""
    shift = tl.load(logits_ptr).to(ACC)
    total = tl.zeros([BLOCK], ACC)
    squares = tl.zeros([BLOCK], ACC)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        inside = i < N
        z = tl.where(inside, tl.load(logits_ptr + i, mask=inside, other=0).to(ACC) - shift, 0)
        total += z
        squares += z * z
    offset = tl.sum(total, 0) / N
    # a NaN variance (a non-finite logit) stays NaN, as torch's: it poisons the running variance as there
    variance = tl.maximum(tl.sum(squares, 0) / N - offset * offset, 0, propagate_nan=tl.PropagateNan.ALL)
    mean = shift + offset
    scale = 1 / tl.sqrt(variance + eps)
    if WEIGHT:
        scale *= tl.load(weight_ptr).to(ACC)
    intercept = -mean * scale
    if BIAS:
        intercept += tl.load(bias_ptr).to(ACC)
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        inside = i < N
        z = tl.load(logits_ptr + i, mask=inside, other=0).to(ACC)
        tl.store(ms_ptr + i, gate(z * scale + intercept, HARD), mask=inside)
    if RUNNING:  # as torch's BatchNorm: the unbiased variance
        running_mean = tl.load(running_mean_ptr).to(ACC)
        running_var = tl.load(running_var_ptr).to(ACC)
        unbiased = variance * N / (N - 1)
        tl.store(running_mean_ptr, (running_mean + factor * (mean - running_mean)).to(
            running_mean_ptr.dtype.element_ty))
        tl.store(running_var_ptr, (running_var + factor * (unbiased - running_var)).to(
            running_var_ptr.dtype.element_ty))


def spatial_norm_gate(logits: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                      running_var: Tensor | None, eps: float, factor: float, hard: bool) -> Tensor:
    """The gate ``ms (B, S)`` of a BatchNorm on the batch statistics of all the logits ``(B, S)`` (more
    than one), with its optional ``weight``, ``bias (1)``; its running statistics ``(1)``, where given,
    moved towards the batch's by ``factor`` (the unbiased variance), in place, as torch's BatchNorm does.
    One launch of one program: the logits, one per position (0.8 MB at batch 64 and 56x56), read twice."""
    (ms,) = small_outputs(logits, logits.shape)
    block = min(power_of_two(logits.numel()), 4 * TILE)
    launch(_spatial_norm_kernel, (1,),
        logits, weight, bias, running_mean, running_var, ms, logits.numel(), float(eps), float(factor),
        WEIGHT=weight is not None, BIAS=bias is not None, RUNNING=running_mean is not None, HARD=hard,
        ACC=acc_type(logits), BLOCK=block, num_warps=warps(1, block))
    return ms


@triton.jit
def _norm_sums_kernel(logits_ptr, ms_ptr, d_ms_ptr, shift_ptr, sums_ptr, N,
                      HARD: tl.constexpr, BATCH: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < N
    z = tl.load(logits_ptr + i, mask=inside, other=0).to(ACC) - tl.load(shift_ptr).to(ACC)
    z = tl.where(inside, z, 0)
    ms = tl.load(ms_ptr + i, mask=inside, other=0).to(ACC)
    dn = gate_grad(ms, tl.load(d_ms_ptr + i, mask=inside, other=0).to(ACC), HARD)
    tl.atomic_add(sums_ptr, tl.sum(dn), sem="relaxed")
    tl.atomic_add(sums_ptr + 1, tl.sum(dn * z), sem="relaxed")
    if BATCH:
        tl.atomic_add(sums_ptr + 2, tl.sum(z), sem="relaxed")
        tl.atomic_add(sums_ptr + 3, tl.sum(z * z), sem="relaxed")


@triton.jit
def _d_logits(at, inside, logits_ptr, ms_ptr, d_ms_ptr, centre, inverse_std, scale, mean_dn, mean_dn_centred,
              HARD: tl.constexpr, NORM: tl.constexpr, BATCH: tl.constexpr, ACC: tl.constexpr):
    """The logits' gradient at the flat positions ``at`` (0 off ``inside``): through the gate and the
    norm (with ``NORM``; on batch statistics with ``BATCH``)."""
    ms = tl.load(ms_ptr + at, mask=inside, other=0).to(ACC)
    dz = gate_grad(ms, tl.load(d_ms_ptr + at, mask=inside, other=0).to(ACC), HARD)
    if NORM:
        if BATCH:
            centred = (tl.load(logits_ptr + at, mask=inside, other=0).to(ACC) - centre) * inverse_std
            dz = dz - mean_dn - centred * mean_dn_centred
        dz = scale * dz
    return tl.where(inside, dz, 0)


@triton.jit
def _spatial_backward_kernel(logits_ptr, ms_ptr, d_ms_ptr, mean_ptr, speak_ptr, w_ptr, shift_ptr, sums_ptr,
                             weight_ptr, running_var_ptr, d_maps_ptr, d_conv_ptr, d_weight_ptr, d_bias_ptr,
                             D, H, W, KD, KH, KW, N, eps, MAPS: tl.constexpr, HARD: tl.constexpr,
                             NORM: tl.constexpr, BATCH: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
                             BLOCK: tl.constexpr):
    centre, inverse_std, scale, mean_dn, mean_dn_centred = 0.0, 0.0, 0.0, 0.0, 0.0  # unused without a norm
    if NORM:  # from the sums of dn, dn * (z - shift), z - shift, (z - shift)^2 over all N logits z
        shift = tl.load(shift_ptr).to(ACC)  # the first logit on batch statistics, else the running mean
        sum_dn = tl.load(sums_ptr)
        if BATCH:
            offset = tl.load(sums_ptr + 2) / N  # the batch mean - shift
            variance = tl.maximum(tl.load(sums_ptr + 3) / N - offset * offset, 0,
                                  propagate_nan=tl.PropagateNan.ALL)  # NaN stays, as in the forward
        else:
            offset = 0.0
            variance = tl.load(running_var_ptr).to(ACC)
        centre = shift + offset
        inverse_std = 1 / tl.sqrt(variance + eps)
        sum_centred = (tl.load(sums_ptr + 1) - offset * sum_dn) * inverse_std  # of dn * (z - centre) / std
        scale = inverse_std
        if AFFINE:
            scale = scale * tl.load(weight_ptr).to(ACC)
        mean_dn, mean_dn_centred = sum_dn / N, sum_centred / N
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(d_weight_ptr, sum_centred)
            tl.store(d_bias_ptr, sum_dn)
    S = D * H * W
    base = tl.program_id(1).to(tl.int64) * S
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s_in = s < S
    d, h, w = s // (H * W), s // W % H, s % W
    mean = tl.load(mean_ptr + base + s, mask=s_in, other=0).to(ACC)
    speak = tl.load(speak_ptr + base + s, mask=s_in, other=0).to(ACC)
    taps = KD * KH * KW
    d_first = tl.zeros([BLOCK], ACC)
    d_second = tl.zeros([BLOCK], ACC)
    for a in range(KD):
        for e in range(KH):
            for f in range(KW):
                # tap t reads s for the logit at s minus its offset: that logit's gradient is its share
                q, inside = _neighbour(d, h, w, s_in, KD // 2 - a, KH // 2 - e, KW // 2 - f, D, H, W)
                dz = _d_logits(base + q, inside, logits_ptr, ms_ptr, d_ms_ptr, centre, inverse_std, scale, mean_dn,
                               mean_dn_centred, HARD, NORM, BATCH, ACC)
                t = (a * KH + e) * KW + f
                d_first += tl.load(w_ptr + t).to(ACC) * dz
                if MAPS == 2:
                    d_second += tl.load(w_ptr + taps + t).to(ACC) * dz
                    tl.atomic_add(d_conv_ptr + t, tl.sum(dz * mean), sem="relaxed")
                    tl.atomic_add(d_conv_ptr + taps + t, tl.sum(dz * speak), sem="relaxed")
                else:
                    tl.atomic_add(d_conv_ptr + t, tl.sum(dz * ((mean + speak) / 2)), sem="relaxed")
    if MAPS == 2:
        tl.store(d_maps_ptr + base + s, d_first, mask=s_in)
        tl.store(d_maps_ptr + N + base + s, d_second, mask=s_in)
    else:
        tl.store(d_maps_ptr + base + s, d_first / 2, mask=s_in)


def spatial_backward(
    logits: Tensor, ms: Tensor, d_ms: Tensor, mean: Tensor, speak: Tensor, conv_w: Tensor, size: list[int],
    kernel: list[int], hard: bool, norm: bool, batch_statistics: bool, weight: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, eps: float,
) -> list[Tensor]:
    """From the gate ``ms = gate(norm(logits))`` and its gradient ``d_ms`` (all ``(B, S)``; hard-sigmoid
    with ``hard``, else sigmoid; with ``norm`` a BatchNorm of optional ``weight (1)`` on the logits'
    statistics with ``batch_statistics``, else on ``running_mean``, ``running_var (1)``) back through
    the conv of ``mean, speak (B, S)`` with ``conv_w (1, I, *kernel)``: ``[d_mean, d_speak (B, S) (one
    tensor for I = 1), d_conv (conv_w's shape), d_weight, d_bias (1) (zeros without a norm)]``."""
    B, S = logits.shape
    N = B * S
    maps = _maps(conv_w, kernel)
    (d_maps,) = small_outputs(logits, (maps, B, S))  # the kernel writes map i at i * N
    sums, d_conv, d_weight, d_bias = small_outputs(logits, (4,), conv_w.shape, (1,), (1,), zero=True)
    d_stats = d_maps.unbind(0) if maps == 2 else [d_maps[0]] * 2  # I = 1: d_mean is d_speak
    result = [*d_stats, d_conv, d_weight, d_bias]
    if N == 0:
        return result
    acc = acc_type(logits)
    shift = logits if batch_statistics else running_mean
    if norm:
        block = min(power_of_two(N), TILE)
        launch(_norm_sums_kernel, (cdiv(N, block),),
            logits, ms, d_ms, shift, sums, N, HARD=hard, BATCH=batch_statistics, ACC=acc, BLOCK=block,
            num_warps=warps(1, block))
    block = _block(logits, S)
    launch(_spatial_backward_kernel, (cdiv(S, block), B),
        logits, ms, d_ms, mean, speak, conv_w, shift, sums, weight, running_var, d_maps, d_conv, d_weight, d_bias,
        *size, *kernel, N, eps, MAPS=maps, HARD=hard, NORM=norm, BATCH=batch_statistics, AFFINE=weight is not None,
        ACC=acc, BLOCK=block, num_warps=warps(1, block))
    return result
