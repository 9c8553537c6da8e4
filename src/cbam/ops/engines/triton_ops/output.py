"""CBAM's output ``y * mc * ms``, ``y = normed(x, input_affine)``, or a residual block's tail
``relu(y * mc * ms + residual)``: one element-wise launch, computed in float32 (float64 for float64
input) and stored once in ``x``'s dtype and layout."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import acc_type, affine_at, cdiv, elementwise_tile, warps
from .launch import launch


@triton.jit
def _apply_kernel(x_ptr, mc_ptr, ms_ptr, residual_ptr, affine_ptr, out_ptr, C, S, sxb, sxc, sxs, srb, src, srs,
                  sob, soc, sos, RESIDUAL: tl.constexpr, NORMED: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c_in, s_in = c < C, s < S
    inside = c_in[:, None] & s_in[None, :]
    y = tl.load(x_ptr + b * sxb + c[:, None] * sxc + s[None, :] * sxs, mask=inside, other=0).to(ACC)
    if NORMED:
        scale, shift = affine_at(affine_ptr, c, c_in, C, ACC)
        y = y * scale[:, None] + shift[:, None]
    mc = tl.load(mc_ptr + b * C + c, mask=c_in, other=0).to(ACC)
    ms = tl.load(ms_ptr + b * S + s, mask=s_in, other=0).to(ACC)
    out = y * mc[:, None] * ms[None, :]
    if RESIDUAL:
        out += tl.load(residual_ptr + b * srb + c[:, None] * src + s[None, :] * srs, mask=inside, other=0).to(ACC)
        out = tl.where(out < 0, 0, out)  # relu that keeps NaN, as torch's
    tl.store(out_ptr + b * sob + c[:, None] * soc + s[None, :] * sos, out.to(out_ptr.dtype.element_ty), mask=inside)


def apply(x: Tensor, mc: Tensor, ms: Tensor, residual: Tensor | None = None,
          input_affine: Tensor | None = None) -> Tensor:
    """``y * mc * ms`` for ``y = normed(x, input_affine)``, ``x: (B, C, *spatial)`` (contiguous or
    channels-last; the output has its dtype, shape and layout), ``mc (B, C)``, ``ms (B, S)``; with a
    ``residual`` shaped like ``x``, ``relu(y * mc * ms + residual)``."""
    B, C = x.shape[:2]
    x3 = x.flatten(2)
    S = x3.shape[2]
    out3 = torch.empty_like(x3)
    residual3 = x3 if residual is None else residual.reshape(B, C, S)
    block_c, block_s = elementwise_tile(C, S)
    launch(_apply_kernel, (cdiv(S, block_s), cdiv(C, block_c), B),
        x3, mc, ms, residual3, input_affine, out3, C, S, *x3.stride(), *residual3.stride(), *out3.stride(),
        RESIDUAL=residual is not None, NORMED=input_affine is not None, ACC=acc_type(x), BLOCK_C=block_c,
        BLOCK_S=block_s, num_warps=warps(block_c, block_s))
    return out3.view(x.shape)
