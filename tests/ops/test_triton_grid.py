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


def test_small_outputs_are_cut_in_order_from_one_allocation():
    x = torch.empty(2, 3, dtype=torch.bfloat16)
    parts = small_outputs(x, (2, 3), (0,), (4,), zero=True)
    assert [tuple(p.shape) for p in parts] == [(2, 3), (0,), (4,)]
    assert all(p.dtype == torch.float32 and p.is_contiguous() and not p.any() for p in parts)
    base = parts[0].untyped_storage().data_ptr()
    assert [p.untyped_storage().data_ptr() for p in parts] == [base] * 3
    assert [p.storage_offset() for p in parts] == [0, 6, 6]
