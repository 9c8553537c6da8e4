"""NaN and ±inf on the fused path against the reference, on every engine: a non-finite input value shows
in the output where the reference's does (no maximum or ReLU that compares with ``>`` swallows a NaN,
no ``0 * inf`` of a pool type's unused vector adds one), and the gradients are NaN where the reference's
are NaN and finite where they are finite (max pooling routes its gradient to one arg-max, the reference
spreads it over the row: there the fused NaNs are a subset, so only "some NaN" is asked)."""

import copy

import pytest
import torch
from torch import nn

import cbam
from cbam.ops import engines
from cbam.ops.fused import NATIVE_POOLS
from layouts import channels_last

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
ENGINES = [name for name in ("torch", "cpp", "triton") if engines.ENGINES[name].load() is not None]
SHAPE = (2, 8, 4, 5)
WHERE = {"element": (0, 3, 1, 2), "position": (0, slice(None), 1, 2), "channel": (0, 3)}
VALUES = (float("nan"), float("inf"), float("-inf"))


def pair(preset, pools, dtype=torch.float32):
    """A reference CBAM with random parameters and running statistics, its fused twin and a BatchNorm
    to fold before it, all in eval mode."""
    torch.manual_seed(0)
    reference = cbam.CBAM(8, 2, 3, preset=preset, pool_types=pools, impl="reference", dtype=dtype)
    norm = nn.BatchNorm2d(8, dtype=dtype)
    with torch.no_grad():
        for p in [*reference.parameters(), *norm.parameters()]:
            p.normal_(0, 0.7)
        for bn in [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)] + [norm]:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    fused = copy.deepcopy(reference)
    fused.impl = "fused"
    return reference.eval(), fused.eval(), norm.eval()


def inputs(dtype=torch.float32, layout="contiguous"):
    """``(name, x)``: a random input with one value made NaN or ±inf at an element, a position or a channel,
    laid out contiguous or channels-last."""
    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    for value in VALUES:
        for where, index in WHERE.items():
            x = base.clone()
            x[index] = value
            yield f"{value} at {where}", x


def run(module, x, residual, norm, grad):
    """Output and, with ``grad``, the gradients (input, residual, parameters) of ``sum(out)``."""
    x = x.detach().requires_grad_(grad)
    residual = None if residual is None else residual.detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = module(x, residual, input_norm=norm)
    if not grad:
        return out, {}
    out.sum().backward()
    found = {"x": x.grad, "residual": None if residual is None else residual.grad}
    found.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), found


def same_non_finite(reference, fused, what):
    for kind, mask in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert bool(torch.equal(mask(reference), mask(fused))), (
            f"{what}: {kind} at {mask(reference).sum()} elements in the reference, {mask(fused).sum()} fused")


def configurations(test):
    """Both sweeps' cases: the paper's and the official preset, each pool form, with and without the residual
    tail (and the folded BatchNorm), contiguous and channels-last."""
    for name, values in (("tail", [False, True]), ("pools", [None, ("avg",), ("max",), ("mix",)]),
                         ("preset", [None, "official"]), ("layout", ["contiguous", "channels_last"])):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@pytest.fixture(params=ENGINES)
def engine(request):
    with engines.using(request.param):
        yield request.param


@configurations
def test_non_finite_input_shows_in_the_output_as_in_the_reference(engine, preset, pools, tail, layout):
    """Inference (the C++ forward tracks no arg-maxima there); the gradient test covers the recorded forward."""
    if engine == "triton" and layout == "channels_last":
        pytest.skip("the interpreted Triton engine's channels-last path: test_triton_cbam (it costs seconds a case)")
    reference, fused, norm = pair(preset, pools)
    residual = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) if tail else None
    for name, x in inputs(layout=layout):
        expected, _ = run(reference, x, residual, norm if tail else None, grad=False)
        found, _ = run(fused, x, residual, norm if tail else None, grad=False)
        same_non_finite(expected, found, f"{name}{' with the tail' if tail else ''}")


@configurations
def test_gradients_of_non_finite_input_are_nan_where_the_reference_has_nan(engine, preset, pools, tail, layout):
    if engine == "triton" and layout == "channels_last":
        pytest.skip("the interpreted Triton engine's channels-last path: test_triton_cbam (it costs seconds a case)")
    reference, fused, norm = pair(preset, pools)
    residual = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) if tail else None
    for name, x in inputs(layout=layout):
        if not name.endswith("element"):  # the other places: in the forward test (the interpreter is slow)
            continue
        out, expected = run(reference, x, residual, norm if tail else None, grad=True)
        fused_out, found = run(fused, x, residual, norm if tail else None, grad=True)
        same_non_finite(out, fused_out, name)
        for key, grad in expected.items():
            if grad is None:
                continue
            what = f"{name}{' with the tail' if tail else ''}: d{key}"
            spurious = grad.isfinite() & ~found[key].isfinite()
            assert not spurious.any(), f"{what}: {spurious.sum()} non-finite where the reference's are finite"
            assert found[key].isnan().any() == grad.isnan().any(), f"{what}: NaN in one, not in the other"


@pytest.mark.parametrize("channels", [8, 37])  # channels-last: whole vectors of channels, and a rest
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pooling_passes_take_a_nan_as_the_maximum(engine, layout, channels):
    """``pool`` and ``gated_stats``: a NaN after the first value of a row is its maximum at its first index, as
    for ``torch.max``; +inf and -inf (a NaN sum, no NaN) leave the maximum +inf."""
    x = torch.randn(2, channels, 100, generator=torch.Generator().manual_seed(1))  # whole vectors and a rest
    x[0, 3, [5, 9]] = x[1, [2, 6], 7] = x[1, [4, 5], 97] = float("nan")
    x[0, 5, [20, 30]] = x[0, [1, 2], 40] = x[0, [3, 4], 98] = torch.tensor([float("inf"), float("-inf")])
    x[1, [3, channels - 2], 50] = float("nan")  # a NaN among the last channels (channels-last: the rest)
    if layout == "channels_last":
        x = channels_last(x)
    mc = torch.rand(2, channels, generator=torch.Generator().manual_seed(2))
    passes = engines.select(x)[1]
    pooled, gated = passes.pool(x)[1:], passes.gated_stats(x, mc)[1:]
    for found, (peak, index) in ((pooled, x.max(2)), (gated, (x * mc[..., None]).max(1))):
        torch.testing.assert_close(found[0], peak, equal_nan=True)
        assert torch.equal(found[1], index)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pooling_passes_take_the_first_of_tied_maxima(engine, layout):
    """``pool`` and ``gated_stats`` at 100 channels and 70 positions (many whole vectors, both accumulator
    chains of the channels-last statistics, and a rest): a maximum tied at several channels or positions,
    across vectors, is found at its first index, as by ``torch.max``."""
    x = torch.randn(2, 100, 70, generator=torch.Generator().manual_seed(8))
    x[0, [20, 28, 36, 45, 77, 99], 3] = x[1, [1, 60], 69] = 9.0  # ties across channels (and lanes, and chains)
    x[0, 7, [10, 50, 66]] = x[1, 33, [0, 40]] = 9.0  # ties across positions in a channel
    mc = torch.ones(2, 100)
    if layout == "channels_last":
        x = channels_last(x)
    passes = engines.select(x)[1]
    for found, (peak, index) in ((passes.pool(x)[1:], x.max(2)), (passes.gated_stats(x, mc)[1:], x.max(1))):
        torch.testing.assert_close(found[0], peak)
        assert torch.equal(found[1], index)
    assert passes.gated_stats(x, mc)[2][0, 3] == 20 and passes.pool(x)[2][0, 7] == 10


def channel_mlp_cases():
    """``(name, avg, peak (2, 8), d_mc (2, 8))``: sample 0 with a NaN in both pooled vectors, with a -inf mean
    (its maximum finite), or with a NaN in the gate's gradient."""
    gen = torch.Generator().manual_seed(3)
    avg, peak, d_mc = torch.randn(3, 2, 8, generator=gen)
    for name, tensors, value in (("NaN", (avg, peak), float("nan")), ("-inf mean", (avg,), float("-inf")),
                                 ("NaN gradient", (d_mc,), float("nan"))):
        changed = {id(t): t.clone() for t in tensors}
        for t in changed.values():
            t[0, 2] = value
        yield name, *(changed.get(id(t), t) for t in (avg, peak, d_mc))


def reference_gate(avg, peak, weights, pools):
    """The reference's channel gate of pooled vectors: descriptors as ``functional.pool`` forms them."""
    forms = {"avg": lambda: avg, "max": lambda: peak, "mix": lambda: (avg + peak) / 2}
    fc1_w, fc1_b, fc2_w, fc2_b = weights
    return torch.sigmoid(cbam.functional.channel_mlp(torch.stack([forms[p]() for p in pools]), fc1_w, fc2_w, fc1_b,
                                                      fc2_b))


@pytest.mark.parametrize("pools", [("avg", "max"), ("max",), ("mix",)])
def test_channel_mlp_keeps_nan_and_adds_none(engine, pools):
    """``channel_gate``: a NaN in the pooled vectors makes the sample's whole gate NaN (torch's ReLU keeps it),
    and an infinite vector that no pool type uses adds no NaN (no ``0 * inf``); ``channel_backward``: the
    gradients are NaN where the reference's (autograd's) are, and finite where they are finite (a dead
    hidden unit passes no NaN)."""
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(shape, generator=gen) for shape in ((4, 8), (4,), (8, 4), (8,))]
    avg_coef, max_coef = [list(c) for c in zip(*(NATIVE_POOLS[p] for p in pools))]
    passes = engines.select(weights[0])[1]
    for case, avg, peak, d_mc in channel_mlp_cases():
        leaves = [t.clone().requires_grad_() for t in (avg, peak, *weights)]
        expected = reference_gate(*leaves[:2], leaves[2:], pools)
        fc1_w, fc1_b, fc2_w, fc2_b = weights
        mc = passes.channel_gate(avg, peak, avg_coef, max_coef, fc1_w, fc1_b, fc2_w, fc2_b, False)
        torch.testing.assert_close(mc, expected.detach(), equal_nan=True, msg=lambda m, case=case: f"{case}: {m}")
        grads = torch.autograd.grad(expected, leaves, d_mc, allow_unused=True)
        found = passes.channel_backward(avg, peak, avg_coef, max_coef, fc1_w, fc1_b, fc2_w, mc, d_mc, False)
        for name, grad, got in zip(("avg", "peak", "fc1_w", "fc1_b", "fc2_w", "fc2_b"), grads, found):
            grad = torch.zeros_like(got) if grad is None else grad
            what = f"{case}: d{name}"
            assert not (grad.isfinite() & ~got.isfinite()).any(), f"{what} non-finite where the reference's are finite"
            assert got.isnan().any() == grad.isnan().any(), f"{what}: NaN in one, not in the other"


def test_a_nan_gradient_stops_at_a_saturated_hard_sigmoid_as_in_the_reference(engine):
    """A NaN in the output's gradient where both hard-sigmoid gates saturate (exactly 1 and 0): torch's relu6
    backward selects 0 there, so the NaN reaches only its own element of the input gradient, not the
    logits, the weights or the pooled paths (a product ``NaN * 0`` had spread it everywhere)."""
    reference = cbam.CBAM(8, 2, 3, preset="official", gate="hard-sigmoid", impl="reference").eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
        reference.channel_att.fc2.bias.fill_(10.0)  # every channel gate 1
        reference.spatial_att.bn.bias.fill_(-10.0)  # every spatial gate 0
    fused = copy.deepcopy(reference)
    fused.impl = "fused"
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    upstream = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    upstream[WHERE["element"]] = float("nan")
    found = []
    for module in (reference, fused):
        leaf = x.clone().requires_grad_()
        found.append(torch.autograd.grad(module(leaf), [leaf, *module.parameters()], upstream))
    names = ["x", *(name for name, _ in reference.named_parameters())]
    assert [int(grad.isnan().sum()) for grad in found[0]] == [1] + [0] * (len(names) - 1)  # the case is as meant
    for name, want, got in zip(names, *found):
        assert torch.equal(want.isnan(), got.isnan()), f"d{name}: NaN at {int(got.isnan().sum())} elements fused"


def test_the_hard_sigmoid_gate_keeps_nan(engine):
    """``relu6(z + 3) / 6`` of a NaN logit is NaN, as torch's; a maximum and minimum that drop NaN gave 0."""
    torch.manual_seed(0)
    reference = cbam.CBAM(8, 2, 3, gate="hard-sigmoid", impl="reference").eval()
    fused = copy.deepcopy(reference)
    fused.impl = "fused"
    for name, x in inputs():
        if name.startswith("nan"):
            same_non_finite(run(reference, x, None, None, grad=False)[0], run(fused, x, None, None, grad=False)[0],
                            f"hard-sigmoid, {name}")
