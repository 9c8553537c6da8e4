"""impl="fused" against the float64 reference (cbam.functional through impl="reference"), and its engines."""

import copy
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cbam
from cbam.ops import engines
from cbam.ops.engines import cpp, torch_ops
from cbam.profile.benchmark import saved_bytes
from layouts import channels_last, laid_out

F64 = torch.float64
ENGINES = ["torch"] + (["cpp"] if cpp.engine() is not None else [])


@pytest.fixture(params=ENGINES)
def engine(request):
    """Run the fused path on one engine at a time (``CBAM_ENGINE``)."""
    with engines.using(request.param):
        yield request.param


def pair(channels, kernel, dims, seed=0, **options):
    """A fused CBAM and a reference CBAM with the same random weights and BN statistics."""
    torch.manual_seed(seed)
    fast = cbam.CBAM(channels, 2, kernel, dims=dims, impl="fused", dtype=F64, **options)
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0, 0.7)
        if fast.spatial_att.bn is not None:
            fast.spatial_att.bn.running_mean.normal_()
            fast.spatial_att.bn.running_var.uniform_(0.5, 2)
    slow = cbam.CBAM(channels, 2, kernel, dims=dims, impl="reference", dtype=F64, **options)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def outputs_and_grads(module, x, upstream, residual=None):
    """The output and the gradients for the input, the residual (when given) and the parameters."""
    leaves = [x.detach().requires_grad_()] + ([] if residual is None else [residual.detach().requires_grad_()])
    out = module(*leaves)
    return [out, *torch.autograd.grad(out, [*leaves, *module.parameters()], upstream)]


@st.composite
def cases(draw):
    dims = draw(st.integers(1, 3))
    return {
        "dims": dims,
        "shape": (draw(st.integers(1, 3)), draw(st.integers(1, 9)),
                  *draw(st.lists(st.integers(1, 7 if dims < 3 else 4), min_size=dims, max_size=dims))),
        "kernel": draw(st.sampled_from([1, 3, 5])),
        "preset": draw(st.sampled_from([None, "timm", "official"])),
        "pools": draw(st.sampled_from([("avg", "max"), ("max",), ("lp", "lse"), ("avg", "max", "lp", "lse", "mix")])),
        "gate": draw(st.sampled_from(["sigmoid", "hard-sigmoid"])),
        "spatial_pool": draw(st.sampled_from(["concat", "mix"])),
        "train": draw(st.booleans()),
        "residual": draw(st.booleans()),
        "layout": draw(st.sampled_from(["contiguous", "channels_last"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_fused_equals_reference_on_random_shapes(engine, case):
    batch, _, *spatial = case["shape"]
    assume(not (case["train"] and case["preset"] and batch * torch.Size(spatial).numel() == 1))  # BN needs 2 values
    fast, slow = pair(case["shape"][1], case["kernel"], case["dims"], case["seed"], preset=case["preset"],
                      pool_types=case["pools"], gate=case["gate"], spatial_pool=case["spatial_pool"])
    fast.train(case["train"])
    slow.train(case["train"])
    x = torch.randn(case["shape"], dtype=F64, generator=torch.Generator().manual_seed(case["seed"]))
    x, upstream = laid_out(x, case["layout"]), laid_out(torch.randn(case["shape"], dtype=F64), case["layout"])
    residual = torch.randn(case["shape"], dtype=F64) if case["residual"] else None
    found = [outputs_and_grads(module, x, upstream, residual) for module in (fast, slow)]
    for got, want in zip(*found):
        torch.testing.assert_close(got, want)
    if case["train"] and fast.spatial_att.bn is not None:
        torch.testing.assert_close(fast.spatial_att.bn.running_mean, slow.spatial_att.bn.running_mean)
        torch.testing.assert_close(fast.spatial_att.bn.running_var, slow.spatial_att.bn.running_var)


@pytest.mark.parametrize("conv", ["factorized", "separable"])
@pytest.mark.parametrize("dims", [2, 3])
def test_fused_light_spatial_convs_train_like_the_reference(engine, conv, dims):
    """A chain of spatial convs (no one-weight C++ path) differentiated through autograd in the backward."""
    fast, slow = pair(6, 3, dims, preset="timm", spatial_conv=conv)
    x = torch.randn(2, 6, *[5, 6, 4][:dims], dtype=F64)
    upstream, residual = torch.randn_like(x), torch.randn_like(x)
    found = [outputs_and_grads(module, x, upstream, residual) for module in (fast, slow)]
    for got, want in zip(*found):
        torch.testing.assert_close(got, want)


class SubclassedBatchNorm(torch.nn.BatchNorm2d):
    """Not a plain BatchNorm to the fused path (as SyncBatchNorm is not): its autograd fallback."""


@pytest.mark.parametrize("norm", [{"affine": False}, {"track_running_stats": False}, {"momentum": None}, "subclass"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_spatial_norm_variants(engine, norm, train):
    """The spatial gate's BatchNorm by hand (no affine, no running statistics, a cumulative average)
    and through autograd (a subclass) against the reference, over two steps of running statistics."""
    fast, slow = pair(6, 3, 2, preset="timm")
    for module in (fast, slow):
        kind, options = (SubclassedBatchNorm, {}) if norm == "subclass" else (torch.nn.BatchNorm2d, norm)
        module.spatial_att.bn = kind(1, dtype=F64, **options)
        module.train(train)
    slow.load_state_dict(fast.state_dict())
    for step in range(2):
        x = torch.randn(3, 6, 5, 7, dtype=F64, generator=torch.Generator().manual_seed(step))
        upstream = torch.randn_like(x)
        for got, want in zip(outputs_and_grads(fast, x, upstream), outputs_and_grads(slow, x, upstream)):
            torch.testing.assert_close(got, want)
    for got, want in zip(fast.spatial_att.bn.buffers(), slow.spatial_att.bn.buffers()):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last, every other sample", "channels_last, 1x1",
                                    "transposed", "empty batch"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_on_other_layouts(engine, layout, with_residual):
    fast, slow = pair(6, 3, 2, preset="official")
    x = torch.randn(2, 6, 5, 7, dtype=F64)
    if layout == "channels_last":
        x = channels_last(x)
    elif layout == "channels_last, every other sample":
        x = channels_last(torch.randn(4, 6, 5, 7, dtype=F64))[::2]
    elif layout == "channels_last, 1x1":  # contiguous too, with other strides along the size-1 dims
        x = torch.randn(2, 6, 1, 1, dtype=F64).to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(2, 6, 7, 5, dtype=F64).transpose(2, 3)
    else:
        x = x[:0]
    upstream = torch.randn(x.shape, dtype=F64)
    residual = torch.randn(x.shape, dtype=F64).to(memory_format=torch.channels_last) if with_residual else None
    found = [outputs_and_grads(module, x, upstream, residual) for module in (fast, slow)]
    for got, want in zip(*found):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("folded", [True, False])
def test_batch_of_one_with_a_channels_last_gradient(engine, train, folded):
    """The input gradient keeps the input's layout when the output's gradient comes in another: torch's CPU
    BatchNorm backward (folded, or the module before CBAM) misread the strides it had at batch 1."""
    fast, slow = pair(8, 3, 2)
    norm = torch.nn.BatchNorm2d(8, dtype=F64).train(train)
    with torch.no_grad():  # a bias: at batch 1 the channel means of the normed batch are the bias, and at 0 the
        norm.bias.normal_()  # MLP's ReLU would sit on its kink, its side decided by rounding
        norm.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 8, 5, 5, dtype=F64)
    upstream = torch.randn(1, 8, 5, 5, dtype=F64).contiguous(memory_format=torch.channels_last)
    found = []
    for module in (fast, slow):
        leaf, bn = x.clone().requires_grad_(), copy.deepcopy(norm)
        out = module(leaf, None, input_norm=bn) if folded else module(bn(leaf))
        found.append(torch.autograd.grad(out, [leaf, *bn.parameters()], upstream))
    for got, want in zip(*found):
        torch.testing.assert_close(got, want)


def test_fused_gradcheck(engine):
    fast, _ = pair(4, 3, 2, preset="official")
    x = torch.randn(2, 4, 4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fast.train(), (x,))
    residual = torch.randn(2, 4, 4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fast.train(), (x, residual))


def test_residual_tail_is_relu_of_the_sum(engine):
    """``cbam(x, residual)`` against ``relu(cbam(x) + residual)`` written out, with about half the sums
    negative so that the ReLU cuts both the value and the gradient."""
    fast, _ = pair(8, 3, 2, preset="timm")
    x = torch.randn(2, 8, 5, 6, dtype=F64)
    residual = torch.randn_like(x)
    upstream = torch.randn_like(x)
    got = outputs_and_grads(fast, x, upstream, residual)
    leaves = [x.clone().requires_grad_(), residual.clone().requires_grad_()]
    want = torch.relu(fast.to(F64)(leaves[0]) + leaves[1])
    assert 0.2 < (want == 0).double().mean().item() < 0.8
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1:3], list(torch.autograd.grad(want, leaves, upstream)))


@pytest.mark.parametrize(("residual", "error", "words"), [
    (torch.zeros(2, 8, 5, 5), ValueError, "residual with the input's shape (2, 8, 5, 6), got (2, 8, 5, 5)"),
    (torch.zeros(2, 8, 5, 6, dtype=F64), ValueError, "dtype torch.float32, got torch.float64"),
    ([0.0], TypeError, "residual to be a torch.Tensor, got list"),
])
def test_residual_must_match_the_input(residual, error, words):
    with pytest.raises(error, match=re.escape(words)):
        cbam.CBAM(8)(torch.zeros(2, 8, 5, 6), residual)


def test_fused_under_autocast_computes_in_the_input_dtype():
    fast, slow = pair(16, 7, 2, preset="timm")
    fast, slow = fast.float().eval(), slow.float().eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, approx = fast(x), slow(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, slow(x), rtol=1e-5, atol=1e-5)
    assert ((approx.float() - got).norm() / got.norm()).item() < 2e-2


def test_max_ties_route_the_whole_gradient_to_one_position(engine):
    """The reference's amax splits a tie's gradient evenly; fused gives it to one arg-max: both are
    subgradients, so their sums over the tied positions agree."""
    fast, slow = pair(3, 1, 1, pool_types=("max",))
    with torch.no_grad():
        for module in (fast, slow):  # positive MLP weights: the ReLU passes, the max pool gets gradient
            module.channel_att.fc1.weight.fill_(0.5)
            module.channel_att.fc2.weight.fill_(0.5)
    x = torch.tensor([[[1.0, 2.0, 2.0, 0.5], [0.1, 0.2, 0.3, 0.4], [3.0, 3.0, 1.0, 0.0]]], dtype=F64)
    upstream = torch.ones_like(x)
    d_fast, d_slow = (outputs_and_grads(m, x, upstream)[1] for m in (fast, slow))
    torch.testing.assert_close(d_fast.sum(), d_slow.sum())
    assert not torch.allclose(d_fast, d_slow)


@pytest.mark.parametrize(("channels", "side"), [(256, 14), (2048, 7)])
def test_saved_bytes_stay_near_the_input(engine, channels, side):
    """Saved for backward: x itself, two int64 index tensors and small vectors, <= 1.1 x the input's
    bytes at ResNet-50's channel counts: per position 6 floats' worth (logits, spatial gate, gated mean
    and max, the int64 index), per channel 4 (the int64 index, the average, the channel gate)."""
    torch.manual_seed(0)
    x = torch.randn(2, channels, side, side)
    results = {impl: saved_bytes(cbam.CBAM(channels, impl=impl, preset="timm").train(), x) / (x.numel() * 4)
               for impl in ("fused", "reference")}
    assert results["fused"] == pytest.approx(1 + 6 / channels + 4 / side**2, abs=1e-12)
    assert results["fused"] <= 1.1 < results["reference"]


needs_compiled = pytest.mark.skipif("cpp" not in ENGINES, reason="the C++ engine did not build here")


@needs_compiled
def test_compiled_passes_equal_the_torch_ops():
    torch.manual_seed(0)
    compiled = cpp.engine()
    x, g = torch.randn(2, 5, 1100, dtype=F64), torch.randn(2, 5, 1100, dtype=F64)  # > one 512-position chunk
    mc, ms = torch.rand(2, 5, dtype=F64), torch.rand(2, 1100, dtype=F64)
    vectors = [torch.randn(2, 1100, dtype=F64), torch.randn(2, 1100, dtype=F64)]
    peak_at = torch.tensor([[0, 511, 512, 1099, 700], [3, 1023, 1024, 5, 600]])  # in every 512-position chunk
    affine = torch.randn(2, 5, dtype=F64)  # a BatchNorm's per-channel scale and shift
    centre = torch.randn(5, dtype=F64)  # its mean, for the sums its backward takes
    calls = [("pool", (x,)), ("gated_stats", (x, mc)), ("apply", (x, mc, ms, None, None)),
             ("apply", (x, mc, ms, g, None)), ("apply", (x, mc, ms, g, affine)),
             ("gate_grads", (g, x, mc, ms, None, peak_at, None, None)),
             ("gate_grads", (g, x, mc, ms, x - 0.5, peak_at, None, None)),
             ("gate_grads", (g, x, mc, ms, x - 0.5, peak_at, affine, None)),
             ("gate_grads", (g, x, mc, ms, x - 0.5, peak_at, affine, centre)),
             ("gate_grads", (g, x, mc, ms, None, peak_at, affine, centre)),
             ("gate_grads", (g[:1], x[:1], mc[:1], ms[:1], x[:1] - 0.5, peak_at[:1], None, None)),  # one sample: chunks
             ("gate_grads", (g[:1], x[:1], mc[:1], ms[:1], x[:1] - 0.5, peak_at[:1], affine, centre))]
    index = torch.randint(0, 5, (2, 1100))
    calls += [("stats_grad", (x, *vectors, index, input_affine, mean)) for input_affine in (None, affine)
              for mean in (None, centre)]
    for name, args in calls:
        for got, want in zip(getattr(compiled, name)(*args), getattr(torch_ops, name)(*args), strict=True):
            torch.testing.assert_close(got, want)
    channel = [torch.randn(2, 5, dtype=F64), torch.randn(2, 5, dtype=F64), torch.randint(0, 1100, (2, 5))]
    args = (g, x, mc, ms, *vectors, index, *channel)
    torch.testing.assert_close(compiled.input_grad(*args), torch_ops.input_grad(*args))


@needs_compiled
@pytest.mark.parametrize("weighted", [True, False])
def test_compiled_batch_norm_backward_equals_torchs(weighted):
    """The compiled engine builds a BatchNorm's backward (on batch statistics) from sums taken by the
    earlier passes, never writing CBAM's input gradient; torch_ops runs torch's own BatchNorm
    backward on that gradient. Channel maxima at positions that gated maxima also take."""
    torch.manual_seed(1)
    compiled = cpp.engine()
    x, g = torch.randn(2, 5, 1100, dtype=F64) + 3, torch.randn(2, 5, 1100, dtype=F64)
    mc, ms = torch.rand(2, 5, dtype=F64), torch.rand(2, 1100, dtype=F64)
    vectors = [torch.randn(2, 1100, dtype=F64), torch.randn(2, 1100, dtype=F64)]
    index = torch.randint(0, 5, (2, 1100))
    channel = [torch.randn(2, 5, dtype=F64), torch.randn(2, 5, dtype=F64), index[:, :5].clone()]
    var, mean = torch.var_mean(x, dim=(0, 2), correction=0)
    invstd, weight = 1 / torch.sqrt(var + 1e-5), torch.randn(5, dtype=F64) if weighted else None
    gated = torch_ops.gate_grads(g, x, mc, ms, None, channel[2], None, mean)[4]
    centred = torch_ops.stats_grad(x, *vectors, index, None, mean)[1]
    args = (g, x, mc, ms, *vectors, index, *channel, gated, centred, mean, invstd, weight)
    for got, want in zip(compiled.batch_norm_input_grad(*args), torch_ops.batch_norm_input_grad(*args), strict=True):
        torch.testing.assert_close(got, want)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("length", [1, 7, 8, 16, 17, 31, 49, 100, 196])
def test_compiled_pool_finds_the_first_maximum(dtype, length):
    """Lane-wise maxima with their first positions, rows that are no whole number of vectors ending
    on an overlapping last vector: with many ties (values from a few integers) the index is the first
    occurrence, as torch.argmax documents, and no value is summed twice."""
    x = torch.randint(0, 3, (3, 40, length), generator=torch.Generator().manual_seed(length)).to(dtype)
    avg, peak, index = cpp.engine().pool(x)
    torch.testing.assert_close(avg, x.mean(2))
    torch.testing.assert_close(peak, x.amax(2))
    torch.testing.assert_close(index, x.argmax(2))


@needs_compiled
@pytest.mark.parametrize("length", [5, 16, 49])
def test_compiled_pool_of_a_row_starting_with_nan_points_inside_it(length):
    """A NaN first value is the row's maximum, at position 0, as torch reports it (no maximum compares
    equal to NaN, and the index must still be a position of the row: the backward writes there)."""
    x = torch.randn(2, 3, length)
    x[1, 2, 0] = float("nan")
    _, peak, index = cpp.engine().pool(x)
    assert peak[1, 2].isnan() and index[1, 2] == 0 == x[1, 2].argmax()
    torch.testing.assert_close(index[0], x[0].argmax(1))


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("positions", [1, 31, 49, 64, 100, 600])
def test_compiled_gated_stats_find_the_first_channel_maximum(dtype, positions):
    """Register blocks of positions and the arrays for the rest (and 512-position chunks): with many
    ties the channel-wise arg-max is the first maximal channel, the mean the plain one."""
    gen = torch.Generator().manual_seed(positions)
    x = torch.randint(0, 3, (2, 37, positions), generator=gen).to(dtype)
    mc = torch.randint(1, 3, (2, 37), generator=gen).to(dtype) / 2
    mean, peak, index = cpp.engine().gated_stats(x, mc)
    gated = x * mc.unsqueeze(2)
    torch.testing.assert_close(mean, gated.mean(1))
    torch.testing.assert_close(peak, gated.amax(1))
    torch.testing.assert_close(index, gated.argmax(1))


@needs_compiled
@pytest.mark.parametrize("kernel", [(1, 1, 5), (1, 3, 5), (3, 3, 1), (5, 3, 3)])
@pytest.mark.parametrize("inputs", [1, 2])
def test_compiled_conv_backward_equals_autograd(kernel, inputs):
    torch.manual_seed(0)
    size = [2, 6, 9] if kernel[0] > 1 else [1, 6, 9]
    maps = torch.randn(3, inputs, int(torch.tensor(size).prod()), dtype=F64)
    weight, d_out = torch.randn(inputs, *kernel, dtype=F64), torch.randn(3, maps.shape[2], dtype=F64)
    got = cpp.engine().conv_backward(maps, d_out, weight, size, list(kernel))
    for found, want in zip(got, torch_ops.conv_backward(maps, d_out, weight, size, list(kernel))):
        torch.testing.assert_close(found, want)


@needs_compiled
def test_output_blocks_are_reused_only_once_freed():
    cpp.empty_cache()
    module = cbam.CBAM(32, preset="timm").eval()
    x = torch.randn(2, 32, 12, 12)
    with torch.no_grad():
        first, second = module(x), module(x)
        assert first.data_ptr() != second.data_ptr()  # both alive: two blocks
        torch.testing.assert_close(first, second)
        pointer = first.data_ptr()
        del first
        assert cpp.cached_bytes() == x.numel() * 4
        third = module(x * 2)  # reuses the freed block, with new values
    assert third.data_ptr() == pointer and cpp.cached_bytes() == 0
    reference = cbam.CBAM(32, preset="timm", impl="reference").eval()
    reference.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(third, reference(x * 2))
    del second, third
    assert cpp.cached_bytes() > 0
    cpp.empty_cache()
    assert cpp.cached_bytes() == 0


def test_output_cache_limit_must_be_a_whole_number(monkeypatch):
    monkeypatch.setenv("CBAM_OUTPUT_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="CBAM_OUTPUT_CACHE_MB.*whole number.*'lots'"):
        cpp.cache_limit_bytes()
    monkeypatch.setenv("CBAM_OUTPUT_CACHE_MB", "3")
    assert cpp.cache_limit_bytes() == 3 << 20


@pytest.mark.parametrize("preset", [None, "timm"])
def test_fused_float32_matches_the_float64_reference(preset):
    """float32 runs other vector lanes than float64: the module against the float64 reference."""
    fast, slow = pair(64, 7, 2, preset=preset)
    fast = fast.float()
    x = torch.randn(3, 64, 20, 20, dtype=F64)
    upstream = torch.randn_like(x)
    for got, want in zip(outputs_and_grads(fast, x.float(), upstream.float()), outputs_and_grads(slow, x, upstream)):
        assert got.dtype == torch.float32
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5  # float32 rounding, summed


def test_fused_on_bfloat16_runs_the_torch_ops():
    """The C++ kernels are float32/float64 only; impl="fused" on bfloat16 runs the torch passes."""
    fast, slow = pair(16, 3, 2, preset="timm")
    x = torch.randn(2, 16, 6, 6, dtype=F64)
    got = fast.bfloat16()(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - slow(x)).norm() / slow(x).norm()).item() < 3e-2


def test_fused_output_may_be_modified_in_place():
    """A residual block does ``out += identity`` on CBAM's output: allowed, and the gradients hold."""
    fast, slow = pair(8, 3, 2, preset="timm")
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    grads = []
    for module in (fast, slow):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        out += leaf
        out.relu_().sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(*grads)


def test_fused_computes_channel_spatial_only():
    with pytest.raises(ValueError, match="fused.*channel-spatial.*'spatial-channel'"):
        cbam.CBAM(8, impl="fused", order="spatial-channel")
