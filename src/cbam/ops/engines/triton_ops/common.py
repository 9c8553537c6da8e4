"""What every Triton pass shares: the NaN-aware maximum with its first index, the gates and their
slopes, the accumulation dtype, tile sizes and grid arithmetic, and the small outputs' allocation.

Big tensors ``(B, C, S)`` are read through their strides (contiguous or channels-last-derived); the
programs of a pass cover ``(C, S)`` tiles of one sample, its offset taken in int64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 2048  # elements one program holds at once
BUSY = 1024  # programs that keep a GPU's SMs busy; the interpreter wants as few as possible
FIRST_OF_NONE = tl.constexpr(2**31 - 1)  # an index larger than any position or channel


@triton.jit
def chunk_max(values, index, axis: tl.constexpr):
    """The maximum of ``values`` along ``axis`` (a NaN is the maximum, as for torch) and the first
    ``index`` (broadcasting to ``values``) where it is; masked entries must hold -inf and come after
    the valid ones, or (per-lane maxima that no position reached) index 0, right for a row of -inf."""
    nan = values != values
    found_nan = tl.max(nan.to(tl.int32), axis) > 0
    peak = tl.where(found_nan, float("nan"), tl.max(tl.where(nan, float("-inf"), values), axis))
    hit = (values == tl.expand_dims(peak, axis)) | (nan & tl.expand_dims(found_nan, axis))
    return peak, tl.min(tl.where(hit, index, FIRST_OF_NONE), axis)


@triton.jit
def affine_at(affine_ptr, c, c_in, C, ACC: tl.constexpr):
    """The folded BatchNorm's ``(scale, shift)`` for channels ``c`` from its ``(2, C)`` map (1 and 0 off range)."""
    scale = tl.load(affine_ptr + c, mask=c_in, other=1).to(ACC)
    shift = tl.load(affine_ptr + C + c, mask=c_in, other=0).to(ACC)
    return scale, shift


@triton.jit
def merge_max(best, at, peak, first):
    """The running maximum ``best`` at ``at`` after a later chunk's ``peak`` at ``first``: taken only
    where strictly larger (or the first NaN), so the first maximal index stays."""
    take = (peak > best) | ((peak != peak) & (best == best))
    return tl.where(take, peak, best), tl.where(take, first, at)


@triton.jit
def gate(z, HARD: tl.constexpr):
    """The gate of logits ``z``: hard-sigmoid ``relu6(z + 3) / 6`` with ``HARD`` (NaN kept, as torch's:
    ``tl.maximum`` and ``tl.minimum`` drop it), else the sigmoid."""
    if HARD:
        return tl.where(z != z, z, tl.minimum(tl.maximum(z + 3, 0), 6) / 6)
    return 1 / (1 + tl.exp(-z))


@triton.jit
def gate_grad(g, d, HARD: tl.constexpr):
    """The gradient at the gate's input from its value ``g`` and the gradient ``d`` at its output:
    for the hard-sigmoid 0 where ``g <= 0`` or ``g >= 1`` (also for a NaN ``d``, as torch's relu6 backward),
    else ``d / 6`` (divided, not multiplied by a float32 1/6, so float64 stays exact); else ``d g (1 - g)``."""
    if HARD:
        return tl.where((g <= 0) | (g >= 1), 0, d) / 6
    return d * (g * (1 - g))


def accumulation(x: Tensor) -> torch.dtype:
    """float64 for float64 ``x``, else float32: the dtype of sums and of the small outputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def acc_type(x: Tensor):
    """``accumulation(x)`` as a Triton dtype."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``: the grid arithmetic on the host, in plain Python
    (``triton.cdiv`` is a constexpr function, a few µs per host call: a dozen per CBAM call)."""
    return -(-a // b)


def power_of_two(n: int) -> int:
    """The least power of two ``>= max(n, 1)`` (a block size)."""
    return 1 << (max(n, 1) - 1).bit_length()


def warps(block_a: int, block_b: int) -> int:
    """Warps for a program holding a ``block_a x block_b`` tile: 8 for a full tile, else 4."""
    return 8 if block_a * block_b >= TILE else 4


def reduction_tile(x: Tensor, outer: int, kept: int, reduced: int) -> tuple[int, int]:
    """Blocks ``(along kept, along reduced)`` for programs that each loop over the ``reduced`` axis for
    ``kept``-sized slices of ``outer`` samples: on a GPU, narrower slices until about ``BUSY``
    programs run; the reduced block fills the tile."""
    block = min(64, power_of_two(kept))
    if x.is_cuda:
        while block > 16 and outer * cdiv(kept, block) < BUSY:
            block //= 2
    return block, min(power_of_two(reduced), max(16, TILE // block))


def elementwise_tile(channels: int, positions: int) -> tuple[int, int]:
    """Blocks ``(BLOCK_C, BLOCK_S)`` of an element-wise pass over ``(B, C, S)``."""
    block_c = min(64, power_of_two(channels))
    return block_c, min(power_of_two(positions), TILE // block_c)


def small_outputs(x: Tensor, *shapes: tuple[int, ...], zero: bool = False) -> list[Tensor]:
    """Contiguous tensors of these shapes in ``accumulation(x)`` on ``x``'s device, each its own allocation
    (a fifth of the host time of cutting them from one); ``zero``ed for atomic sums, cut in order from one
    zeroed allocation instead (one launch)."""
    dtype, device = accumulation(x), x.device
    if zero:
        sizes = [math.prod(shape) for shape in shapes]
        flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
        return [part.view(shape) for part, shape in zip(torch.split_with_sizes(flat, sizes), shapes)]
    return [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
