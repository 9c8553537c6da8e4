"""The Triton engine's passes against ``torch_ops`` run in float64 on the same values (an independent
oracle), on the CPU through the Triton interpreter where no GPU is present.

Tolerances, by the dtype of the output compared: float64 1e-10 (sums in another order); float32
1e-5 relative and 1e-5 of the reference's largest magnitude absolute (float32 sums of tens to
thousands of terms; every small output is float32, whatever the input's dtype, because the inputs
widen exactly); bfloat16 and float16 big outputs their machine epsilon (2^-7, 2^-10), as they are
computed in float32 and rounded once. Indices must be equal. Every call runs with ``torch.empty`` and
``torch.empty_like`` returning NaN-filled tensors (indices: -7777), so an element a kernel fails to
write shows.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels
pytest.importorskip("triton")

from poison import poisoned  # noqa: E402

from cbam.ops.engines import torch_ops  # noqa: E402
from cbam.ops.engines import triton_ops as engine  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, C, spatial): odd sizes, C no power of two, B = 1, S = 1, and tiles left over in both axes
CASES = [(2, 5, (3, 7)), (1, 37, (5, 5)), (3, 3, (1, 1)), (2, 70, (9, 9))]
LAYOUTS = ["contiguous", "channels_last"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def run(name: str, *args, **kwargs):
    """The engine's pass ``name`` on poisoned allocations."""
    with poisoned():
        return getattr(engine, name)(*args, **kwargs)


def small(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the small vectors passed in and out with ``dtype`` input."""
    return F64 if dtype == F64 else torch.float32


def wide(t):
    return None if t is None else t.to(F64)


def check(out, ref):
    """``out`` equals the float64 ``ref`` within the rounding of ``out``'s dtype (indices: exactly)."""
    assert out.shape == ref.shape
    if not out.is_floating_point():
        assert out.dtype == torch.int64
        assert torch.equal(out.cpu(), ref.cpu())
        return
    tol = 1e-10 if out.dtype == F64 else max(torch.finfo(out.dtype).eps, 1e-5)
    scale = max(1.0, ref.nan_to_num(0, 0, 0).abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol * scale, equal_nan=True)


def same_layout(a, b) -> bool:
    """Whether ``a`` and ``b`` (same shape) have the same strides along their dims longer than 1."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def big(spatial, batch, channels, dtype, layout, values=None):
    """A ``(B, C, *spatial)`` tensor in ``layout`` and its ``(B, C, S)`` view."""
    values = torch.randn(batch, channels, *spatial) if values is None else values
    x = values.to(device=DEVICE, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(spatial) == 2 else torch.channels_last_3d)
    flat = x.flatten(2)
    if layout == "channels_last" and channels > 1 and flat.shape[2] > 1:
        assert flat.stride()[1:] == (1, channels)
    return x, flat


def distinct_rows(batch, channels, spatial):
    """Values with no ties along any row (over positions): a shuffled range per row, a row offset,
    quarter steps (exact in bfloat16 and float16)."""
    positions = math.prod(spatial)
    order = torch.argsort(torch.rand(batch, channels, positions), dim=2)
    offset = torch.randint(-3, 4, (batch, channels, 1))
    return ((order - positions // 2 + offset) / 4).view(batch, channels, *spatial)


def vector(*shape, dtype=torch.float32, low=0.0, high=1.0):
    return torch.empty(*shape, device=DEVICE, dtype=dtype).uniform_(low, high)


def affine_map(channels, dtype):
    """A per-channel map (2, C): scales of either sign, bounded away from 0."""
    sign = torch.where(torch.rand(channels) < 0.5, -1.0, 1.0)
    return torch.stack([sign * (0.5 + torch.rand(channels)), torch.randn(channels)]).to(DEVICE, small(dtype))


parametrize = pytest.mark.parametrize
each_case = parametrize("batch,channels,spatial", CASES)
each_dtype = parametrize("dtype", DTYPES, ids=str)
each_layout = parametrize("layout", LAYOUTS)


@each_case
@each_dtype
@each_layout
def test_pool(batch, channels, spatial, dtype, layout):
    _, x = big(spatial, batch, channels, dtype, layout, distinct_rows(batch, channels, spatial))
    for affine in (None, affine_map(channels, dtype)):
        found = run("pool", x, affine) if affine is not None else run("pool", x)
        expected = torch_ops.pool(torch_ops.normed(wide(x), wide(affine)))
        for out, ref in zip(found, expected):
            check(out, ref)
        assert found[0].dtype == small(dtype) and found[0].is_contiguous()


@each_case
@each_dtype
@each_layout
def test_gated_stats(batch, channels, spatial, dtype, layout):
    _, x = big(spatial, batch, channels, dtype, layout, distinct_rows(batch, channels, spatial))
    mc = vector(batch, channels, dtype=small(dtype), low=0.1)
    for affine in (None, affine_map(channels, dtype)):
        found = run("gated_stats", x, mc, affine) if affine is not None else run("gated_stats", x, mc)
        expected = torch_ops.gated_stats(torch_ops.normed(wide(x), wide(affine)), wide(mc))
        for out, ref in zip(found, expected):
            check(out, ref)


@each_case
@each_dtype
@each_layout
def test_apply(batch, channels, spatial, dtype, layout):
    x, x3 = big(spatial, batch, channels, dtype, layout)
    residual, _ = big(spatial, batch, channels, dtype, layout)
    mc, ms = vector(batch, channels, dtype=small(dtype)), vector(batch, x3.shape[2], dtype=small(dtype))
    for tail in (None, residual):
        for affine in (None, affine_map(channels, dtype)):
            out = run("apply", x, mc, ms, tail, affine)
            check(out, torch_ops.apply(wide(x), wide(mc), wide(ms), wide(tail), wide(affine)))
            assert out.dtype == dtype and same_layout(out, x)


@parametrize("spatial", [(11,), (2, 3, 5)])
@each_layout
def test_apply_1d_3d(spatial, layout):
    if layout == "channels_last" and len(spatial) == 1:
        values = torch.randn(2, 5, 11).transpose(1, 2).contiguous().transpose(1, 2)  # strides (S*C, 1, C)
        x, x3 = values.to(DEVICE), values.to(DEVICE)
    else:
        x, x3 = big(spatial, 2, 5, torch.float32, layout)
    mc, ms = vector(2, 5), vector(2, x3.shape[2])
    out = run("apply", x, mc, ms, x)
    check(out, torch_ops.apply(wide(x), wide(mc), wide(ms), wide(x)))
    assert same_layout(out, x)


def gate_inputs(batch, channels, spatial, dtype, layout):
    grad, x = (big(spatial, batch, channels, dtype, layout)[1] for _ in range(2))
    rectified = big(spatial, batch, channels, dtype, layout)[1].relu()  # zeros where the ReLU was off
    positions = x.shape[2]
    mc, ms = vector(batch, channels, dtype=small(dtype)), vector(batch, positions, dtype=small(dtype))
    channel_index = torch.randint(0, positions, (batch, channels), device=DEVICE)
    return grad, x, rectified, mc, ms, channel_index


@each_case
@each_dtype
@each_layout
def test_gate_grads(batch, channels, spatial, dtype, layout):
    grad, x, rectified, mc, ms, channel_index = gate_inputs(batch, channels, spatial, dtype, layout)
    centre = torch.randn(channels, device=DEVICE, dtype=small(dtype))
    for tail in (None, rectified):
        for affine, mean in ((None, None), (affine_map(channels, dtype), centre)):
            found = run("gate_grads", grad, x, mc, ms, tail, channel_index, affine, mean)
            expected = torch_ops.gate_grads(wide(grad), wide(x), wide(mc), wide(ms), wide(tail), channel_index,
                                            wide(affine), wide(mean))
            for out, ref in zip(found[:2] + found[3:4], expected[:2] + expected[3:4]):
                check(out, ref)
                assert out.dtype == small(dtype)
            through = found[2]
            if tail is None:
                assert through is grad
            else:
                check(through, expected[2])
                assert through.dtype == dtype and same_layout(through, x)
            assert (found[4] is None) == (mean is None)
            if mean is not None:
                check(found[4], expected[4])


def test_gate_grads_mixed_layouts():
    """A contiguous gradient for a channels-last ``x`` (and the other way round)."""
    for layouts in (LAYOUTS, LAYOUTS[::-1]):
        grad = big((4, 3), 2, 6, torch.float32, layouts[0])[1]
        _, x, rectified, mc, ms, channel_index = gate_inputs(2, 6, (4, 3), torch.float32, layouts[1])
        found = run("gate_grads", grad, x, mc, ms, rectified, channel_index)
        expected = torch_ops.gate_grads(wide(grad), wide(x), wide(mc), wide(ms), wide(rectified), channel_index)
        for out, ref in zip(found[:4], expected[:4]):
            check(out, ref)


def stats_inputs(batch, channels, positions, dtype):
    d_mean, d_peak = (torch.randn(batch, positions, device=DEVICE, dtype=small(dtype)) for _ in range(2))
    index = torch.randint(0, channels, (batch, positions), device=DEVICE)
    return d_mean, d_peak, index


@each_case
@each_dtype
@each_layout
def test_stats_grad(batch, channels, spatial, dtype, layout):
    _, x = big(spatial, batch, channels, dtype, layout)
    d_mean, d_peak, index = stats_inputs(batch, channels, x.shape[2], dtype)
    centre = torch.randn(channels, device=DEVICE, dtype=small(dtype))
    for affine, mean in ((None, None), (affine_map(channels, dtype), centre)):
        d_mc, centred = run("stats_grad", x, d_mean, d_peak, index, affine, mean)
        ref_d_mc, ref_centred = torch_ops.stats_grad(wide(x), wide(d_mean), wide(d_peak), index, wide(affine),
                                                     wide(mean))
        check(d_mc, ref_d_mc)
        assert (centred is None) == (mean is None)
        if mean is not None:
            check(centred, ref_centred)


def backward_inputs(batch, channels, spatial, dtype, layout):
    grad, x, _, mc, ms, channel_index = gate_inputs(batch, channels, spatial, dtype, layout)
    d_mean, d_peak, index = stats_inputs(batch, channels, x.shape[2], dtype)
    d_avg, d_max = (torch.randn(batch, channels, device=DEVICE, dtype=small(dtype)) for _ in range(2))
    return grad, x, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index


@each_case
@each_dtype
@each_layout
def test_input_grad(batch, channels, spatial, dtype, layout):
    inputs = backward_inputs(batch, channels, spatial, dtype, layout)
    dx = run("input_grad", *inputs)
    check(dx, torch_ops.input_grad(*(wide(t) if t.is_floating_point() else t for t in inputs)))
    assert dx.dtype == dtype and same_layout(dx, inputs[1])


def batch_norm_reference(x, weight, bias, eps):
    """mean, biased var, invstd and the map (2, C) of a BatchNorm on the batch statistics of ``x (B, C,
    S)``, in float64."""
    x = wide(x)
    mean, var = x.mean((0, 2)), x.var((0, 2), unbiased=False)
    invstd = 1 / torch.sqrt(var + eps)
    scale = invstd * (1 if weight is None else wide(weight))
    return mean, var, invstd, torch.stack([scale, (0 if bias is None else wide(bias)) - mean * scale])


@each_case
@each_dtype
@each_layout
def test_batch_norm_pool(batch, channels, spatial, dtype, layout):
    _, x = big(spatial, batch, channels, dtype, layout, distinct_rows(batch, channels, spatial) + 5)
    weight = torch.randn(channels, device=DEVICE, dtype=small(dtype))  # either sign
    weight[0] = 0  # every value maps to the bias: the first position is the max
    bias = torch.randn(channels, device=DEVICE, dtype=small(dtype))
    for w, b in ((None, None), (weight, bias)):
        found = run("batch_norm_pool", x, w, b, 1e-5)
        mean, var, invstd, affine = batch_norm_reference(x, w, b, 1e-5)
        avg, peak, index = torch_ops.pool(torch_ops.normed(wide(x), affine))
        if w is not None:
            index[:, 0] = 0
        for out, ref in zip(found, [avg, peak, index, mean, var, invstd, affine]):
            check(out, ref)
            assert out.is_contiguous()


def test_batch_norm_pool_far_from_zero():
    """Statistics of values far from 0 with a small spread: centred sums, no cancellation."""
    values = 1000 + torch.randn(3, 4, 50, dtype=F64) * 1e-2
    mean, var, invstd, affine = engine.batch_norm_pool(values.float().to(DEVICE), None, None, 1e-5)[3:]
    reference = batch_norm_reference(values.float(), None, None, 1e-5)
    torch.testing.assert_close(var.to(F64), reference[1], rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.to(F64), reference[0], rtol=1e-7, atol=0)


@parametrize("dtype", [torch.float32, F64], ids=str)
def test_batch_norm_affine(dtype):
    mean, weight, bias = (torch.randn(37, device=DEVICE, dtype=dtype) for _ in range(3))
    var = torch.rand(37, device=DEVICE, dtype=dtype) + 0.1
    for w, b in ((None, None), (weight, None), (None, bias), (weight, bias)):
        found = run("batch_norm_affine", w, b, mean, var, 1e-3)
        scale = (1 / torch.sqrt(wide(var) + 1e-3)) * (1 if w is None else wide(w))
        check(found, torch.stack([scale, (0 if b is None else wide(b)) - wide(mean) * scale]))
        assert found.dtype == dtype


@each_case
@each_dtype
@each_layout
def test_batch_norm_input_grad(batch, channels, spatial, dtype, layout):
    grad, x, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index = backward_inputs(
        batch, channels, spatial, dtype, layout)
    mean, _, invstd, _ = batch_norm_reference(x, None, None, 1e-5)
    # the sums the earlier passes take on the way (float64, then as the engine receives them)
    gated = torch_ops.gate_grads(wide(grad), wide(x), wide(mc), wide(ms), None, channel_index, centre=mean)[4]
    centred = torch_ops.stats_grad(wide(x), wide(d_mean), wide(d_peak), index, centre=mean)[1]
    weight = torch.randn(channels, device=DEVICE, dtype=small(dtype))
    for w in (None, weight):
        inputs = (grad, x, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index)
        statistics = (gated, centred, mean, invstd)
        found = run("batch_norm_input_grad", *inputs, *(t.to(small(dtype)) for t in statistics), w)
        expected = torch_ops.batch_norm_input_grad(*(wide(t) if t.is_floating_point() else t for t in inputs),
                                                   *statistics, wide(w))
        for out, ref in zip(found, expected):
            check(out, ref)
        assert found[0].dtype == dtype and found[0].stride() == x.stride()


def ties():
    """(2, 3, 5) rows with repeated maxima, NaNs (the first one wins), -inf only, all equal."""
    nan, inf = math.nan, math.inf
    first = [[1, 3, 3, 0, 3], [2, nan, 5, nan, 1], [-inf] * 5]
    second = [[4, 4, 4, 4, 4], [nan, 0, 0, 0, 0], [-1, -2, -1, -3, -1]]
    return torch.tensor([first, second], device=DEVICE)


@each_dtype
def test_first_index_on_ties_and_nan(dtype):
    x = ties().to(dtype)
    for out, ref in zip(run("pool", x), torch_ops.pool(wide(x))):
        check(out, ref)
    ones = torch.ones(2, 3, device=DEVICE, dtype=small(dtype))
    for out, ref in zip(run("gated_stats", x, ones)[1:], torch_ops.gated_stats(wide(x), wide(ones))[1:]):
        check(out, ref)


def test_batch_norm_pool_ties():
    """Tied maxima and minima: the first, whichever way the map turns the row."""
    x = torch.tensor([[[1.0, 3, 3, 0, 0], [2, 2, 5, 5, 2]]], device=DEVICE)
    for sign in (1.0, -1.0):
        weight = torch.full((2,), sign, device=DEVICE)
        found = run("batch_norm_pool", x, weight, None, 1e-5)
        affine = batch_norm_reference(x, weight, None, 1e-5)[3]
        for out, ref in zip(found[:3], torch_ops.pool(torch_ops.normed(wide(x), affine))):
            check(out, ref)


def test_empty_batch():
    x = torch.randn(0, 3, 4, device=DEVICE)
    mc, ms = torch.rand(0, 3, device=DEVICE), torch.rand(0, 4, device=DEVICE)
    assert [t.shape for t in run("pool", x)] == [(0, 3)] * 3
    assert [t.shape for t in run("gated_stats", x, mc)] == [(0, 4)] * 3
    assert run("apply", x, mc, ms).shape == x.shape
