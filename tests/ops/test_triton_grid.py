"""The Triton wrappers' host-side grid arithmetic (plain Python, for speed) agrees with Triton's own."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels
triton = pytest.importorskip("triton")

from cbam.ops.engines.triton_ops.common import cdiv, power_of_two, small_outputs  # noqa: E402


def test_cdiv_equals_tritons():
    for a in range(0, 700):
        for b in (1, 2, 3, 7, 16, 64, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b) == math.ceil(a / b), (a, b)


def test_power_of_two_equals_tritons_where_it_is_defined():
    for n in range(1, 5000):
        assert power_of_two(n) == triton.next_power_of_2(n), n
    assert power_of_two(0) == 1  # a block size: never 0 (Triton's gives 0, which no tile can be)


def test_zeroed_small_outputs_are_cut_in_order_from_one_allocation():
    x = torch.empty(2, 3, dtype=torch.bfloat16)
    parts = small_outputs(x, (2, 3), (0,), (4,), zero=True)
    assert [tuple(p.shape) for p in parts] == [(2, 3), (0,), (4,)]
    assert all(p.dtype == torch.float32 and p.is_contiguous() and not p.any() for p in parts)
    base = parts[0].untyped_storage().data_ptr()
    assert [p.untyped_storage().data_ptr() for p in parts] == [base] * 3
    assert [p.storage_offset() for p in parts] == [0, 6, 6]


def test_small_outputs_are_apart():
    x = torch.empty(2, 3, dtype=torch.float64)
    parts = small_outputs(x, (2, 3), (0,), (4,))
    assert [tuple(p.shape) for p in parts] == [(2, 3), (0,), (4,)]
    assert all(p.dtype == torch.float64 and p.is_contiguous() for p in parts)
    assert parts[0].untyped_storage().data_ptr() != parts[2].untyped_storage().data_ptr()


def test_channel_mlp_tiles_fill_a_gpu_and_hold_a_fixed_product():
    from cbam.ops.engines.triton_ops.channel_mlp import PRODUCTS, PROGRAMS, _grid, _tiles

    for B, H, C in ((64, 128, 2048), (64, 16, 256), (128, 32, 512), (8, 4, 64), (1, 2, 8)):
        gpu, cpu = _tiles(B, H, C, on_gpu=True), _tiles(B, H, C, on_gpu=False)
        assert math.prod(_grid(gpu, B=B, H=H)) >= PROGRAMS or max(gpu["BLOCK_B"], gpu["BLOCK_H"]) <= 4
        for tiles in (gpu, cpu):
            assert all(power_of_two(edge) == edge for edge in tiles.values())
            assert tiles["BLOCK_B"] * tiles["BLOCK_H"] * tiles["BLOCK_C"] <= max(PRODUCTS, 16**3)
        assert cpu["BLOCK_B"] == min(16, power_of_two(B)) and cpu["BLOCK_H"] == min(16, power_of_two(H))
    big = _tiles(64, 128, 2048, on_gpu=True)  # ResNet-50's last stage: 32 programs of 16 x 16 before
    assert math.prod(_grid(big, B=64, H=128)) == 128 and big["BLOCK_C"] == PRODUCTS // 64
