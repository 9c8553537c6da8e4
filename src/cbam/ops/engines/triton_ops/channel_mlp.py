"""The channel gate's shared MLP on the pooled vectors, forward (two launches) and backward (two), instead
of the dozen small torch ops (and their launches) it takes otherwise.

``mc = gate(sum_p fc2(relu(fc1(a_p * avg + m_p * peak))))`` for ``avg, peak (B, C)``, ``fc1 (H, C)`` and
``fc2 (C, H)`` with biases, ``p`` over the pool types' ``(a_p, m_p)`` coefficients (at most three). fc1 is
linear, so every pool type's pre-activation comes from the same two products ``U = avg @ fc1ᵀ`` and
``V = peak @ fc1ᵀ``: ``pre_p = a_p U + m_p V + b1``; fc2 is linear too, so it runs once on
``r = sum_p relu(pre_p)``. Products are sums of ``(BLOCK_B, BLOCK_H, BLOCK_C)`` tiles in float32
(float64 for float64 vectors), never ``tl.dot`` (TF32 on a GPU). Each sums along its tile's last axis:
Triton rewrites ``sum(a[:, :, None] * b[None, :, :], 1)`` into a TF32 ``tt.dot`` for a GPU (seen on an
H100: gradients 1e-3 off), which ``cbam.profile.triton_targets`` checks every kernel for.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from .common import acc_type, cdiv, gate, gate_grad, power_of_two, small_outputs
from .launch import launch

PRODUCTS = 4096  # a program's (BLOCK_B, BLOCK_H, BLOCK_C) tile of products (fp32: 32 per thread each, 4 warps)
PROGRAMS = 128  # programs over (B, H) that keep a GPU's SMs busy: the sums over C are long at 2048 channels
# the weights' gradients sum over the batch on (H, C) tiles: 16 x 16 x 16, which already gives enough programs
# (on an H100 at 2048x7², batch 64: 15.9 µs; 26.1 µs on the (B, H)-narrowed tiles of the other kernels)
WEIGHT_BLOCK = 16
MAX_POOLS = 3


@triton.jit
def _coefficient(p: tl.constexpr, C0, C1, C2):
    """The ``p``-th of three scalar coefficients (``p`` known when compiling)."""
    if p == 0:
        return C0
    elif p == 1:
        return C1
    else:
        return C2


@triton.jit
def _mixed(a, u, m, v):
    """``a * u + m * v`` with a term of coefficient 0 left out (``0 * inf`` would be a NaN the reference lacks)."""
    return tl.where(a == 0, 0, a * u) + tl.where(m == 0, 0, m * v)


@triton.jit
def _relu(z):
    """``relu(z)`` keeping NaN, as torch's (``tl.maximum`` drops it)."""
    return tl.where(z <= 0, 0, z)


@triton.jit
def _two_tiles(first_ptr, second_ptr, b, c, b_in, c_in, C, ACC: tl.constexpr):
    """The ``(b, c)`` tiles ``(BLOCK_B, BLOCK_C)`` of two ``(B, C)`` tensors, in ``ACC`` (0 outside them)."""
    rows = b[:, None] * C + c[None, :]
    row_in = b_in[:, None] & c_in[None, :]
    first = tl.load(first_ptr + rows, mask=row_in, other=0).to(ACC)
    return first, tl.load(second_ptr + rows, mask=row_in, other=0).to(ACC)


@triton.jit
def _products(avg_ptr, peak_ptr, w1_ptr, b, h, b_in, h_in, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """``U = avg @ fc1ᵀ`` and ``V = peak @ fc1ᵀ`` on the ``(b, h)`` tile ``(BLOCK_B, BLOCK_H)``."""
    u = tl.zeros([b.shape[0], h.shape[0], BLOCK_C], ACC)  # per lane, reduced over channels after the loop
    v = tl.zeros([b.shape[0], h.shape[0], BLOCK_C], ACC)
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_in = c < C
        avg, peak = _two_tiles(avg_ptr, peak_ptr, b, c, b_in, c_in, C, ACC)
        w1 = tl.load(w1_ptr + h[:, None] * C + c[None, :], mask=h_in[:, None] & c_in[None, :], other=0).to(ACC)
        u += avg[:, None, :] * w1[None, :, :]
        v += peak[:, None, :] * w1[None, :, :]
    return tl.sum(u, 2), tl.sum(v, 2)


@triton.jit
def _hidden_kernel(avg_ptr, peak_ptr, w1_ptr, b1_ptr, hidden_ptr, B, C, H, A0, A1, A2, M0, M1, M2,
                   POOLS: tl.constexpr, BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_in, h_in = b < B, h < H
    u, v = _products(avg_ptr, peak_ptr, w1_ptr, b, h, b_in, h_in, C, ACC, BLOCK_C)
    bias = tl.load(b1_ptr + h, mask=h_in, other=0).to(ACC)[None, :] if BIAS else 0
    hidden = tl.zeros([BLOCK_B, BLOCK_H], ACC)
    for p in tl.static_range(POOLS):
        pre = _mixed(_coefficient(p, A0, A1, A2), u, _coefficient(p, M0, M1, M2), v) + bias
        hidden += _relu(pre)
    tl.store(hidden_ptr + b[:, None] * H + h[None, :], hidden, mask=b_in[:, None] & h_in[None, :])


@triton.jit
def _gate_kernel(hidden_ptr, w2_ptr, b2_ptr, mc_ptr, B, C, H, POOLS: tl.constexpr, BIAS: tl.constexpr,
                 HARD: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b_in, c_in = b < B, c < C
    products = tl.zeros([BLOCK_B, BLOCK_C, BLOCK_H], ACC)  # per lane, reduced over hidden units after the loop
    for start in range(0, H, BLOCK_H):
        h = start + tl.arange(0, BLOCK_H)
        h_in = h < H
        hidden = tl.load(hidden_ptr + b[:, None] * H + h[None, :], mask=b_in[:, None] & h_in[None, :], other=0)
        w2 = tl.load(w2_ptr + c[:, None] * H + h[None, :], mask=c_in[:, None] & h_in[None, :], other=0).to(ACC)
        products += hidden[:, None, :] * w2[None, :, :]
    logits = tl.sum(products, 2)
    if BIAS:
        logits += POOLS * tl.load(b2_ptr + c, mask=c_in, other=0).to(ACC)[None, :]
    tl.store(mc_ptr + b[:, None] * C + c[None, :], gate(logits, HARD), mask=b_in[:, None] & c_in[None, :])


def _coefficients(avg_coef: list[float], max_coef: list[float]) -> dict[str, float]:
    if not 1 <= len(avg_coef) == len(max_coef) <= MAX_POOLS:
        raise ValueError(f"channel MLP: expected 1 to {MAX_POOLS} pool types' coefficients, got {avg_coef}, {max_coef}")
    padded = [[*coef, *[0.0] * (MAX_POOLS - len(coef))] for coef in (avg_coef, max_coef)]
    return {f"{name}{i}": float(value) for name, coef in zip("AM", padded) for i, value in enumerate(coef)}


def _tiles(B: int, H: int, C: int, on_gpu: bool) -> dict[str, int]:
    """Tile edges: at most 16 samples and hidden units, narrower on a GPU until about ``PROGRAMS``
    programs cover ``(B, H)`` (down to 4), and the channels that fill ``PRODUCTS``."""
    block_b, block_h = min(16, power_of_two(B)), min(16, power_of_two(H))
    while on_gpu and cdiv(B, block_b) * cdiv(H, block_h) < PROGRAMS and max(block_b, block_h) > 4:
        if block_b >= block_h:
            block_b //= 2
        else:
            block_h //= 2
    block_c = min(power_of_two(C), max(16, PRODUCTS // (block_b * block_h)))
    return {"BLOCK_B": block_b, "BLOCK_H": block_h, "BLOCK_C": block_c}


def _grid(blocks: dict[str, int], **extents: int) -> tuple[int, ...]:
    """Programs over the named extents (``B``, ``H``, ``C``), in order."""
    return tuple(cdiv(extent, blocks[f"BLOCK_{axis}"]) for axis, extent in extents.items())


def channel_gate(avg: Tensor, peak: Tensor, avg_coef: list[float], max_coef: list[float], fc1_w: Tensor,
                 fc1_b: Tensor | None, fc2_w: Tensor, fc2_b: Tensor | None, hard: bool) -> Tensor:
    """The channel gate ``mc (B, C)`` of the pooled ``avg, peak (B, C)`` (contiguous, float32 or float64)
    through ``fc1_w (H, C)``, ``fc1_b (H)``, ``fc2_w (C, H)``, ``fc2_b (C)`` (biases may be ``None``) and
    the sigmoid (hard-sigmoid with ``hard``). Two launches: the hidden sums, then the gate."""
    B, C = avg.shape
    H = fc1_w.shape[0]
    hidden, mc = small_outputs(avg, (B, H), (B, C))
    if B == 0:
        return mc
    acc = acc_type(avg)
    blocks = _tiles(B, H, C, avg.is_cuda)
    launch(_hidden_kernel, _grid(blocks, B=B, H=H),
        avg, peak, fc1_w, fc1_b, hidden, B, C, H, **_coefficients(avg_coef, max_coef), POOLS=len(avg_coef),
        BIAS=fc1_b is not None, ACC=acc, **blocks)
    launch(_gate_kernel, _grid(blocks, B=B, C=C),
        hidden, fc2_w, fc2_b, mc, B, C, H, POOLS=len(avg_coef), BIAS=fc2_b is not None, HARD=hard, ACC=acc, **blocks)
    return mc


@triton.jit
def _hidden_grads_kernel(avg_ptr, peak_ptr, w1_ptr, b1_ptr, w2_ptr, mc_ptr, d_mc_ptr, hidden_ptr, B, C, H,
                         A0, A1, A2, M0, M1, M2, POOLS: tl.constexpr, BIAS: tl.constexpr, HARD: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per sample and hidden unit: ``r = sum_p relu(pre_p)`` and the pre-activations' gradients summed
    with the avg coefficients, the max coefficients and plainly, into ``hidden (4, B, H)``."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_in, h_in = b < B, h < H
    u, v = _products(avg_ptr, peak_ptr, w1_ptr, b, h, b_in, h_in, C, ACC, BLOCK_C)
    d_r = tl.zeros([BLOCK_B, BLOCK_H, BLOCK_C], ACC)  # d_logits @ fc2, per lane until after the loop
    for start in range(0, C, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_in = c < C
        mc, d_mc = _two_tiles(mc_ptr, d_mc_ptr, b, c, b_in, c_in, C, ACC)
        d_logits = gate_grad(mc, d_mc, HARD)
        w2 = tl.load(w2_ptr + c[None, :] * H + h[:, None], mask=h_in[:, None] & c_in[None, :], other=0).to(ACC)
        d_r += d_logits[:, None, :] * w2[None, :, :]  # (h, c) tile
    d_r = tl.sum(d_r, 2)
    bias = tl.load(b1_ptr + h, mask=h_in, other=0).to(ACC)[None, :] if BIAS else 0
    hidden = tl.zeros([BLOCK_B, BLOCK_H], ACC)
    d_avg_side = tl.zeros([BLOCK_B, BLOCK_H], ACC)
    d_max_side = tl.zeros([BLOCK_B, BLOCK_H], ACC)
    d_pre_sum = tl.zeros([BLOCK_B, BLOCK_H], ACC)
    for p in tl.static_range(POOLS):
        a, m = _coefficient(p, A0, A1, A2), _coefficient(p, M0, M1, M2)
        pre = _mixed(a, u, m, v) + bias
        hidden += _relu(pre)
        d_pre = tl.where(pre <= 0, 0, d_r)  # torch's ReLU backward: a NaN pre-activation passes the gradient
        d_avg_side += tl.where(a == 0, 0, a * d_pre)
        d_max_side += tl.where(m == 0, 0, m * d_pre)
        d_pre_sum += d_pre
    at = b[:, None] * H + h[None, :]
    inside = b_in[:, None] & h_in[None, :]
    plane = B * H
    tl.store(hidden_ptr + at, hidden, mask=inside)
    tl.store(hidden_ptr + plane + at, d_avg_side, mask=inside)
    tl.store(hidden_ptr + 2 * plane + at, d_max_side, mask=inside)
    tl.store(hidden_ptr + 3 * plane + at, d_pre_sum, mask=inside)


@triton.jit
def _vector_grads_tile(hidden_ptr, w1_ptr, d_avg_ptr, d_max_ptr, b_block, c_block, B, C, H, ACC: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """``d_avg = E_a @ fc1`` and ``d_max = E_m @ fc1`` on the ``(b, c)`` tile ``(b_block, c_block)``."""
    b = b_block * BLOCK_B + tl.arange(0, BLOCK_B)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    b_in, c_in = b < B, c < C
    d_avg = tl.zeros([BLOCK_B, BLOCK_C, BLOCK_H], ACC)  # per lane, reduced over hidden units after the loop
    d_max = tl.zeros([BLOCK_B, BLOCK_C, BLOCK_H], ACC)
    for start in range(0, H, BLOCK_H):
        h = start + tl.arange(0, BLOCK_H)
        h_in = h < H
        at = b[:, None] * H + h[None, :]
        inside = b_in[:, None] & h_in[None, :]
        e_avg = tl.load(hidden_ptr + B * H + at, mask=inside, other=0)[:, None, :]
        e_max = tl.load(hidden_ptr + 2 * B * H + at, mask=inside, other=0)[:, None, :]
        w1 = tl.load(w1_ptr + h[None, :] * C + c[:, None], mask=c_in[:, None] & h_in[None, :], other=0).to(ACC)
        d_avg += e_avg * w1[None, :, :]  # (c, h) tile
        d_max += e_max * w1[None, :, :]
    out = b[:, None] * C + c[None, :]
    inside = b_in[:, None] & c_in[None, :]
    tl.store(d_avg_ptr + out, tl.sum(d_avg, 2), mask=inside)
    tl.store(d_max_ptr + out, tl.sum(d_max, 2), mask=inside)


@triton.jit
def _weight_grads_tile(avg_ptr, peak_ptr, mc_ptr, d_mc_ptr, hidden_ptr, d_w1_ptr, d_b1_ptr, d_w2_ptr, d_b2_ptr,
                       h_block, c_block, B, C, H, POOLS: tl.constexpr, AVG: tl.constexpr, MAX: tl.constexpr,
                       HARD: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """On the ``(h, c)`` tile ``(h_block, c_block)``, sums over the samples: ``d_w1 = E_aᵀ avg + E_mᵀ peak``
    (only the terms of the vectors some pool type uses, ``AVG``, ``MAX``: an unused one may be infinite),
    ``d_w2 = d_logitsᵀ r``; the first tile along each axis also sums ``d_b1`` (over ``E``) and ``d_b2``
    (``POOLS`` times ``d_logits``)."""
    h = h_block * BLOCK_H + tl.arange(0, BLOCK_H)
    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    h_in, c_in = h < H, c < C
    d_w1 = tl.zeros([BLOCK_H, BLOCK_C], ACC)
    d_w2 = tl.zeros([BLOCK_H, BLOCK_C], ACC)
    d_b1 = tl.zeros([BLOCK_H], ACC)
    d_b2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, B, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B)
        b_in = b < B
        avg, peak = _two_tiles(avg_ptr, peak_ptr, b, c, b_in, c_in, C, ACC)
        mc, d_mc = _two_tiles(mc_ptr, d_mc_ptr, b, c, b_in, c_in, C, ACC)
        d_logits = gate_grad(mc, d_mc, HARD)
        at = b[:, None] * H + h[None, :]
        inside = b_in[:, None] & h_in[None, :]
        hidden = tl.load(hidden_ptr + at, mask=inside, other=0)
        e_avg = tl.load(hidden_ptr + B * H + at, mask=inside, other=0)
        e_max = tl.load(hidden_ptr + 2 * B * H + at, mask=inside, other=0)
        if AVG and MAX:
            products = e_avg[:, :, None] * avg[:, None, :] + e_max[:, :, None] * peak[:, None, :]
        elif AVG:
            products = e_avg[:, :, None] * avg[:, None, :]
        else:
            products = e_max[:, :, None] * peak[:, None, :]
        d_w1 += tl.sum(products, 0)
        d_w2 += tl.sum(hidden[:, :, None] * d_logits[:, None, :], 0)
        d_b1 += tl.sum(tl.load(hidden_ptr + 3 * B * H + at, mask=inside, other=0), 0)
        d_b2 += tl.sum(d_logits, 0)
    inside = h_in[:, None] & c_in[None, :]
    tl.store(d_w1_ptr + h[:, None] * C + c[None, :], d_w1, mask=inside)
    tl.store(d_w2_ptr + c[None, :] * H + h[:, None], d_w2, mask=inside)
    if c_block == 0:
        tl.store(d_b1_ptr + h, d_b1, mask=h_in)
    if h_block == 0:
        tl.store(d_b2_ptr + c, POOLS * d_b2, mask=c_in)


@triton.jit
def _vector_and_weight_grads_kernel(hidden_ptr, w1_ptr, avg_ptr, peak_ptr, mc_ptr, d_mc_ptr, d_avg_ptr, d_max_ptr,
                                    d_w1_ptr, d_b1_ptr, d_w2_ptr, d_b2_ptr, B, C, H, POOLS: tl.constexpr,
                                    AVG: tl.constexpr, MAX: tl.constexpr, HARD: tl.constexpr, ACC: tl.constexpr,
                                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                                    WEIGHT_BLOCK: tl.constexpr):
    """Two independent sets of tiles in one launch: the first programs take the vectors' gradients on
    ``(b, c)`` tiles, the others the weights' on ``WEIGHT_BLOCK``-edged ``(h, c)`` tiles."""
    tile = tl.program_id(0)
    vector_columns = tl.cdiv(C, BLOCK_C)
    vector_tiles = tl.cdiv(B, BLOCK_B) * vector_columns
    if tile < vector_tiles:
        _vector_grads_tile(hidden_ptr, w1_ptr, d_avg_ptr, d_max_ptr, tile // vector_columns, tile % vector_columns,
                           B, C, H, ACC, BLOCK_B, BLOCK_H, BLOCK_C)
    else:
        tile -= vector_tiles
        weight_columns = tl.cdiv(C, WEIGHT_BLOCK)
        _weight_grads_tile(avg_ptr, peak_ptr, mc_ptr, d_mc_ptr, hidden_ptr, d_w1_ptr, d_b1_ptr, d_w2_ptr, d_b2_ptr,
                           tile // weight_columns, tile % weight_columns, B, C, H, POOLS, AVG, MAX, HARD, ACC,
                           WEIGHT_BLOCK, WEIGHT_BLOCK, WEIGHT_BLOCK)


def channel_backward(avg: Tensor, peak: Tensor, avg_coef: list[float], max_coef: list[float], fc1_w: Tensor,
                     fc1_b: Tensor | None, fc2_w: Tensor, mc: Tensor, d_mc: Tensor, hard: bool) -> list[Tensor]:
    """Gradients of ``channel_gate`` given the gate ``mc`` it returned and ``d_mc (B, C)``: ``[d_avg, d_max
    (B, C), d_fc1_w (H, C), d_fc1_b (H), d_fc2_w (C, H), d_fc2_b (C)]`` (bias gradients whether or not the
    biases exist). Two launches: per sample and hidden unit, then the vectors' and the weights' side by side."""
    B, C = avg.shape
    H = fc1_w.shape[0]
    hidden, d_avg, d_max, d_w1, d_b1, d_w2, d_b2 = small_outputs(avg, (4, B, H), (B, C), (B, C), (H, C), (H,),
                                                                 (C, H), (C,))
    if B == 0:
        return [d_avg, d_max, *(t.zero_() for t in (d_w1, d_b1, d_w2, d_b2))]
    acc = acc_type(avg)
    blocks = _tiles(B, H, C, avg.is_cuda)
    pools, hard_gate = len(avg_coef), bool(hard)
    launch(_hidden_grads_kernel, _grid(blocks, B=B, H=H),
        avg, peak, fc1_w, fc1_b, fc2_w, mc, d_mc, hidden, B, C, H, **_coefficients(avg_coef, max_coef), POOLS=pools,
        BIAS=fc1_b is not None, HARD=hard_gate, ACC=acc, **blocks)
    tiles = math.prod(_grid(blocks, B=B, C=C)) + cdiv(H, WEIGHT_BLOCK) * cdiv(C, WEIGHT_BLOCK)
    launch(_vector_and_weight_grads_kernel, (tiles,),
        hidden, fc1_w, avg, peak, mc, d_mc, d_avg, d_max, d_w1, d_b1, d_w2, d_b2, B, C, H, POOLS=pools,
        AVG=any(avg_coef), MAX=any(max_coef), HARD=hard_gate, ACC=acc, WEIGHT_BLOCK=WEIGHT_BLOCK, **blocks)
    return [d_avg, d_max, d_w1, d_b1, d_w2, d_b2]
