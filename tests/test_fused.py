"""impl="fused" against the float64 reference (cbam.functional through impl="reference"), and its engines."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cbam
from cbam.ops import cpu_extension, fused, torch_passes
from cbam.profile.benchmark import saved_bytes

F64 = torch.float64
ENGINES = {"torch": torch_passes}
if cpu_extension.engine() is not None:
    ENGINES["compiled"] = cpu_extension.engine()


@pytest.fixture(params=list(ENGINES))
def engine(request, monkeypatch):
    """Run the fused path on one engine at a time."""
    monkeypatch.setattr(fused, "_engine", lambda x: ENGINES[request.param] if x.is_contiguous() else torch_passes)
    return request.param


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


def outputs_and_grads(module, x, upstream):
    leaf = x.detach().requires_grad_()
    out = module(leaf)
    return [out, *torch.autograd.grad(out, [leaf, *module.parameters()], upstream)]


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
    upstream = torch.randn(case["shape"], dtype=F64)
    for got, want in zip(outputs_and_grads(fast, x, upstream), outputs_and_grads(slow, x, upstream)):
        torch.testing.assert_close(got, want)
    if case["train"] and fast.spatial_att.bn is not None:
        torch.testing.assert_close(fast.spatial_att.bn.running_mean, slow.spatial_att.bn.running_mean)
        torch.testing.assert_close(fast.spatial_att.bn.running_var, slow.spatial_att.bn.running_var)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "empty batch"])
def test_fused_on_other_layouts(layout):
    fast, slow = pair(6, 3, 2, preset="official")
    x = torch.randn(2, 6, 5, 7, dtype=F64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = torch.randn(2, 6, 7, 5, dtype=F64).transpose(2, 3)
    else:
        x = x[:0]
    upstream = torch.randn(x.shape, dtype=F64)
    for got, want in zip(outputs_and_grads(fast, x, upstream), outputs_and_grads(slow, x, upstream)):
        torch.testing.assert_close(got, want)


def test_fused_gradcheck(engine):
    fast, _ = pair(4, 3, 2, preset="official")
    x = torch.randn(2, 4, 4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fast.train(), (x,))


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


def test_saved_bytes_stay_near_the_input(engine):
    """Saved for backward: x itself, two index tensors and small vectors: <= 1.1 x the input's bytes
    at ResNet-50's channel counts (C >= 256; the per-position extras are ~24 bytes against 4 C)."""
    torch.manual_seed(0)
    x = torch.randn(2, 256, 14, 14)
    results = {impl: saved_bytes(cbam.CBAM(256, impl=impl, preset="timm").train(), x) / (x.numel() * 4)
               for impl in ("fused", "reference")}
    assert results["fused"] <= 1.1 < results["reference"]


@pytest.mark.skipif("compiled" not in ENGINES, reason="the C++ engine did not build here")
def test_compiled_passes_equal_the_torch_passes():
    torch.manual_seed(0)
    compiled = ENGINES["compiled"]
    x, g = torch.randn(2, 5, 1100, dtype=F64), torch.randn(2, 5, 1100, dtype=F64)  # > one 512-position chunk
    mc, ms = torch.rand(2, 5, dtype=F64), torch.rand(2, 1100, dtype=F64)
    vectors = [torch.randn(2, 1100, dtype=F64), torch.randn(2, 1100, dtype=F64)]
    calls = [("pool", (x,)), ("gated_stats", (x, mc)), ("apply", (x, mc, ms)), ("gate_grads", (g, x, mc, ms))]
    for name, args in calls:
        for got, want in zip(getattr(compiled, name)(*args), getattr(torch_passes, name)(*args)):
            torch.testing.assert_close(got, want)
    index = torch.randint(0, 5, (2, 1100))
    torch.testing.assert_close(compiled.stats_grad(x, *vectors, index), torch_passes.stats_grad(x, *vectors, index))
    channel = [torch.randn(2, 5, dtype=F64), torch.randn(2, 5, dtype=F64), torch.randint(0, 1100, (2, 5))]
    args = (g, x, mc, ms, *vectors, index, *channel)
    torch.testing.assert_close(compiled.input_grad(*args), torch_passes.input_grad(*args))


def test_auto_picks_fused_only_where_it_is_exact():
    from cbam.ops import fused_applies

    x = torch.randn(1, 4, 3, 3)
    assert fused_applies("auto", "channel-spatial", x)
    assert not fused_applies("auto", "spatial-channel", x)
    assert not fused_applies("auto", "channel-spatial", x.half())
    assert not fused_applies("reference", "channel-spatial", x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_applies("auto", "channel-spatial", x)
    with pytest.raises(ValueError, match="fused.*channel-spatial.*'spatial-channel'"):
        cbam.CBAM(8, impl="fused", order="spatial-channel")
