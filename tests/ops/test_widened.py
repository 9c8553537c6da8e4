"""bfloat16/float16 CPU input on the C++ engine: float16 computed on a float32 copy (``engines.widened_dtype``),
bfloat16 read and written as stored where the one-call forward applies (``Engine.reads_as_stored``), both in float32
arithmetic: the output in the input's dtype and layout, gradients, the fold and the residual tail, train and eval,
against a float64 CBAM given the same (rounded) input, and the as-stored path against the widened one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cbam
from cbam.ops import engine_for, fused
from cbam.ops.engines import cpp

pytestmark = pytest.mark.skipif(cpp.engine() is None, reason="the C++ engine does not build here")

HALVES = [torch.bfloat16, torch.float16]
ROUNDING = {torch.bfloat16: 2**-8, torch.float16: 2**-11}  # one rounding of a value: relative


def _pair(channels: int, training: bool):
    torch.manual_seed(0)
    module = cbam.CBAM(channels, 4, 3, preset="timm", impl="fused")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    oracle = cbam.CBAM(channels, 4, 3, preset="timm", impl="reference", dtype=torch.float64)
    oracle.load_state_dict(module.state_dict())
    return module.train(training), oracle.train(training)


def _norms(channels: int, training: bool):
    torch.manual_seed(1)
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(0, 0.2)
        norm.running_mean.normal_(0, 0.2), norm.running_var.uniform_(0.5, 1.5)
    oracle = nn.BatchNorm2d(channels, dtype=torch.float64)
    oracle.load_state_dict(norm.state_dict())
    return norm.train(training), oracle.train(training)


@pytest.fixture
def passes_dtypes(monkeypatch):
    """The dtypes of the ``x`` every fused forward ran its passes on (with or without saving for backward)."""
    seen = []

    def recorded(real):
        def recording(x, *args, **kwargs):
            seen.append(x.dtype)
            return real(x, *args, **kwargs)
        return recording

    for name in ("forward_saving", "forward_without_saving"):
        monkeypatch.setattr(fused, name, recorded(getattr(fused, name)))
    return seen


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("tail", ["plain", "residual", "fold"])
def test_half_input_is_computed_in_float32_and_returned_in_its_dtype(passes_dtypes, dtype, layout, training, tail):
    """float16 on a float32 copy; bfloat16 as stored, but for the backward of a fold on running statistics."""
    channels = 12
    module, oracle = _pair(channels, training)
    norm, norm_oracle = _norms(channels, training) if tail == "fold" else (None, None)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, channels, 5, 7, generator=generator).to(dtype).contiguous(memory_format=layout)
    residual = torch.randn(x.shape, generator=generator).to(dtype) if tail != "plain" else None
    upstream = torch.randn(x.shape, generator=generator).to(dtype).double()  # as the output's gradient arrives
    assert engine_for(x) == "cpp" and engine_for(x, widened=False) == ("cpp" if dtype == torch.bfloat16 else "torch")

    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (x, residual)]
    got = module(leaves[0], leaves[1], input_norm=norm)
    (got.double() * upstream).sum().backward()
    as_stored = dtype == torch.bfloat16 and not (tail == "fold" and not training)
    assert set(passes_dtypes) == {dtype if as_stored else torch.float32}
    assert got.dtype == dtype and got.is_contiguous(memory_format=layout)

    wide = [t if t is None else t.detach().double().requires_grad_() for t in (x, residual)]
    want = oracle(wide[0] if norm_oracle is None else norm_oracle(wide[0]), wide[1])
    (want * upstream).sum().backward()
    rounding = ROUNDING[dtype]
    torch.testing.assert_close(got.double(), want.detach(), rtol=2 * rounding, atol=2 * rounding)
    for leaf, reference in zip(leaves, wide):
        if leaf is not None:
            assert leaf.grad.dtype == dtype
            scale = reference.grad.abs().max().item()
            torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=4 * rounding, atol=4 * rounding * scale)
    named = dict(oracle.named_parameters())
    for name, param in module.named_parameters():
        assert param.grad.dtype == torch.float32, name
        scale = named[name].grad.abs().max().item()
        torch.testing.assert_close(param.grad.double(), named[name].grad, rtol=1e-4, atol=1e-4 * scale)
    if norm is not None:
        torch.testing.assert_close(norm.running_mean.double(), norm_oracle.running_mean, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", HALVES)
def test_inference_leaves_the_input_as_it_was(dtype):
    """The output may overwrite the float32 copy, never the caller's tensor."""
    module, _ = _pair(8, training=False)
    x = torch.randn(2, 8, 6, 6).to(dtype)
    kept = x.clone()
    with torch.no_grad():
        out = module(x)
    assert torch.equal(x, kept) and out.dtype == dtype and out.data_ptr() != x.data_ptr()


def test_an_explicit_torch_engine_is_not_widened(passes_dtypes, monkeypatch):
    monkeypatch.setenv("CBAM_ENGINE", "torch")
    module, _ = _pair(8, training=False)
    x = torch.randn(2, 8, 6, 6).bfloat16()
    assert engine_for(x) == "torch"
    with torch.no_grad():
        assert module(x).dtype == torch.bfloat16
    assert passes_dtypes == [torch.bfloat16]


@pytest.mark.parametrize("calibrate", ["1", "0"])
def test_half_input_into_a_float32_cbam_outside_autocast_runs_fused_either_way(monkeypatch, calibrate):
    """The reference cannot take bfloat16 into float32 weights (torch's linear refuses mixed dtypes); ``auto``
    ran it anyway to time it, and raised, where calibration was on. Now fused either way, float64-close."""
    monkeypatch.setenv("CBAM_CALIBRATE", calibrate)
    module, oracle = _pair(8, training=False)
    module.impl = "auto"
    x = torch.randn(2, 8, 6, 6).bfloat16()
    with torch.no_grad():
        got = module(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), oracle(x.double()), rtol=2**-7, atol=2**-7)


@pytest.fixture
def native_reads(monkeypatch):
    """The dtypes of the ``x`` each one-call C++ forward read."""
    seen = []
    real = fused._native_forward

    def recording(passes, x, *args, **kwargs):
        seen.append(x.dtype)
        return real(passes, x, *args, **kwargs)

    monkeypatch.setattr(fused, "_native_forward", recording)
    return seen


def _widened(module, x, residual, norm):
    """The widened computation, spelled out: a float32 copy through the fused path, the output rounded back."""
    spec, weights = module._fused_inputs()
    wide_residual = None if residual is None else residual.float()
    return fused.checked_fused_cbam(x.float(), spec, weights, wide_residual, norm, False).to(x.dtype)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("tail", ["plain", "residual", "fold"])
@pytest.mark.parametrize("shape", [(3, 12, 5, 7), (2, 40, 9, 9), (1, 33, 3, 17)])
@pytest.mark.parametrize("training", [False, True])
def test_bfloat16_inference_is_read_as_stored_with_the_widened_bits(native_reads, layout, tail, shape, training):
    """No gradient: the C++ passes read and write bfloat16 themselves (no float32 copy), in eval mode and in
    training mode (BatchNorms on batch statistics: the spatial one, and the fold's, which pools in a pass of its
    own), and compute exactly the bits of the widened path (float32 arithmetic on the same values, rounded once)
    and the same running statistics, within one bfloat16 rounding of a float64 CBAM."""
    channels = shape[1]
    module, oracle = _pair(channels, training)
    norm, norm_oracle = _norms(channels, training) if tail == "fold" else (None, None)
    twin, twin_norm = copy.deepcopy(module), copy.deepcopy(norm)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator).bfloat16().contiguous(memory_format=layout)
    residual = torch.randn(shape, generator=generator).bfloat16() if tail == "residual" else None
    with torch.no_grad():
        got = module(x, residual, input_norm=norm)
        assert native_reads == [torch.bfloat16]
        want = _widened(twin, x, residual, twin_norm)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=layout)
    assert torch.equal(got, want)
    for kept, twin_kept in zip([*module.buffers(), *(norm.buffers() if norm else [])],
                               [*twin.buffers(), *(twin_norm.buffers() if twin_norm else [])]):
        assert torch.equal(kept, twin_kept)
    wide = x.double() if norm_oracle is None else norm_oracle(x.double())
    expected = oracle(wide, None if residual is None else residual.double())
    torch.testing.assert_close(got.double(), expected.detach(), rtol=2 * ROUNDING[torch.bfloat16],
                               atol=2 * ROUNDING[torch.bfloat16])


def test_bfloat16_special_values_read_as_stored_match_the_widened_path(native_reads):
    module, _ = _pair(8, training=False)
    x = torch.randn(2, 8, 6, 6).bfloat16()
    x[0, 1, 2, 3], x[1, 2, 0, 0], x[1, 3] = float("nan"), float("inf"), -3e38
    with torch.no_grad():
        got = module(x)
        assert native_reads == [torch.bfloat16]
        want = _widened(module, x, None, None)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("case", ["lp pooling", "factorized conv", "float16"])
@pytest.mark.parametrize("training", [False, True])
def test_input_the_one_call_forward_cannot_take_is_widened(native_reads, case, training):
    """Where the C++ one-call forward does not apply (other pooling, a conv chain), or for float16: widened, with
    a gradient or without."""
    options = {"lp pooling": {"pool_types": ("avg", "lp")}, "factorized conv": {"spatial_conv": "factorized"}}
    torch.manual_seed(0)
    module = cbam.CBAM(8, 4, 3, preset="timm", impl="fused", **options.get(case, {})).train(training)
    x = torch.randn(2, 8, 6, 6).to(torch.float16 if case == "float16" else torch.bfloat16).requires_grad_(training)
    got = module(x)
    if training:
        got.float().sum().backward()
        assert x.grad.dtype == x.dtype
    assert got.dtype == x.dtype and torch.bfloat16 not in native_reads


def _trained(module, norm, x, residual, upstream, widened: bool):
    """The output and every gradient (input, residual, CBAM's and the norm's parameters) of one backward of
    ``upstream``: through the module, or through the widened path spelled out."""
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (x, residual)]
    if widened:
        spec, weights = module._fused_inputs()
        wide_residual = None if residual is None else leaves[1].float()
        got = fused.checked_fused_cbam(leaves[0].float(), spec, weights, wide_residual, norm, False).to(x.dtype)
    else:
        got = module(leaves[0], leaves[1], input_norm=norm)
    (got.float() * upstream).sum().backward()
    params = [*module.parameters(), *(norm.parameters() if norm is not None else [])]
    return got, [t.grad for t in leaves if t is not None], [p.grad for p in params]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("tail", ["plain", "residual", "fold", "fold and residual"])
@pytest.mark.parametrize("shape", [(3, 12, 5, 7), (2, 40, 9, 9), (1, 33, 3, 17)])
def test_bfloat16_training_is_read_as_stored_and_matches_the_widened_path(passes_dtypes, layout, tail, shape):
    """Training: forward and backward passes read x, the residual and the gradient as bfloat16 and write the
    output, the input and residual gradients as bfloat16. The output has the widened path's bits; the gradients
    its values up to float32 summation order (the vectorised sums group lanes otherwise), then one rounding."""
    channels = shape[1]
    module, _ = _pair(channels, training=True)
    norm = _norms(channels, training=True)[0] if tail.startswith("fold") else None
    twin, twin_norm = copy.deepcopy(module), copy.deepcopy(norm)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=generator).bfloat16().contiguous(memory_format=layout)
    residual = torch.randn(shape, generator=generator).bfloat16() if tail.endswith("residual") else None
    upstream = torch.randn(shape, generator=generator).bfloat16().float()

    got, got_inputs, got_params = _trained(module, norm, x, residual, upstream, widened=False)
    assert set(passes_dtypes) == {torch.bfloat16}
    want, want_inputs, want_params = _trained(twin, twin_norm, x, residual, upstream, widened=True)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=layout)
    for found, expected in zip(got_inputs, want_inputs):  # one bfloat16 step apart at most (2 roundings)
        assert found.dtype == torch.bfloat16
        scale = expected.abs().max().item()
        torch.testing.assert_close(found.float(), expected.float(), rtol=2 * ROUNDING[torch.bfloat16],
                                   atol=1e-5 * scale)
    for found, expected in zip(got_params, want_params):
        scale = expected.abs().max().item()
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5 * scale)


def test_a_float32_residual_beside_bfloat16_input_is_widened(native_reads):
    """``fused_cbam`` takes residuals of another dtype (``CBAM`` refuses them): the widened path adds it in
    float32; the bfloat16 forward, which reads the residual as bfloat16, is not taken."""
    module, oracle = _pair(8, training=False)
    x = torch.randn(2, 8, 6, 6).bfloat16()
    residual = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        got = fused.fused_cbam(x, *module._fused_inputs(), residual=residual)
    assert native_reads == [torch.float32] and got.dtype == torch.bfloat16
    want = oracle(x.double(), residual.double())
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=2**-7)
