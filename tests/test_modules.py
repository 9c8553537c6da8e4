"""The modules: functional parity for every preset and 1/2/3-D, gradients, options, torch integration."""

import copy
import math

import pytest
import torch
from torch import nn

import cbam
from cbam import functional

import naive

PRESETS = [None, "paper", "timm", "official"]
DIMS = [1, 2, 3]
IMPLS = ["reference", "fused"]


def make(preset, dims, channels=12, kernel=3, pools=None, dtype=torch.float64, seed=0, impl="auto"):
    """A CBAM with random weights and, where it has a spatial BN, random running statistics."""
    torch.manual_seed(seed)
    module = cbam.CBAM(channels, 4, kernel, preset=preset, pool_types=pools, dims=dims, dtype=dtype, impl=impl)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        if module.spatial_att.bn is not None:
            module.spatial_att.bn.running_mean.normal_()
            module.spatial_att.bn.running_var.uniform_(0.5, 2)
    return module


def weights(module):
    ca, sa = module.channel_att, module.spatial_att
    return {"fc1_weight": ca.fc1.weight, "fc2_weight": ca.fc2.weight, "conv_weight": sa.conv.weight,
            "fc1_bias": ca.fc1.bias, "fc2_bias": ca.fc2.bias}


def shape(dims, batch=2, channels=12):
    return (batch, channels, *[5, 4, 3][:dims])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("preset", PRESETS)
def test_module_equals_functional_and_naive(preset, dims, impl):
    module = make(preset, dims, pools=("avg", "max", "lp", "lse"), impl=impl).eval()
    x = torch.randn(shape(dims), dtype=torch.float64)
    options = {"pool_types": module.channel_att.pool_types, "gate_kind": module.channel_att.gate}
    want = functional.cbam(x, **weights(module), norm=module.spatial_att.bn, **options)
    exact = {"rtol": 0, "atol": 0} if impl == "reference" else {}  # fused: the same math, other rounding
    torch.testing.assert_close(module(x), want, **exact)
    bn = module.spatial_att.bn
    norm = None if bn is None else (
        lambda z: naive.batch_norm_eval(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps))
    torch.testing.assert_close(module(x), naive.cbam(x, **weights(module), norm=norm, **options))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("preset", PRESETS)
def test_gradcheck_and_gradgradcheck_in_float64(preset, dims, impl):
    """Passes in float64. The tutorial's float32 gradcheck cannot: finite differences in float32
    have errors far above gradcheck's tolerances (and its lambda builds a fresh random CBAM per call).
    The fused backward is not differentiable again: gradgradcheck is for the reference."""
    module = make(preset, dims, channels=4, kernel=3, pools=("avg", "max", "lp", "lse"), impl=impl).eval()
    x = torch.randn(2, 4, *[4, 3, 2][:dims], dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    inputs = (x, *module.parameters())
    # fast_mode compares Jacobians along random directions; the full ones cost minutes in 3-D
    assert torch.autograd.gradcheck(f, inputs, fast_mode=dims == 3)
    if impl == "reference":
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)
    else:
        with pytest.raises(RuntimeError, match="no double backward.*impl='reference'"):
            torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_in_train_mode_with_batch_norm(impl):
    module = make("official", 2, channels=4, impl=impl).train()
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


@pytest.mark.parametrize("dims", DIMS)
def test_attention_returns_the_gates(dims):
    module = make(None, dims, dtype=torch.float32).eval()
    x = torch.randn(shape(dims))
    maps = module.attention(x)
    assert maps.channel.shape == (2, 12, *[1] * dims)
    assert maps.spatial.shape == (2, 1, *x.shape[2:])
    for gate in maps:
        assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(module(x), x * maps.channel * maps.spatial)
    torch.testing.assert_close(module.channel_att(x), x * module.channel_att.attention(x))
    torch.testing.assert_close(module.spatial_att(x), x * module.spatial_att.attention(x))


def test_hard_sigmoid_gate():
    module = make(None, 2, dtype=torch.float64).eval()
    hard = cbam.CBAM(12, 4, 3, gate="hard-sigmoid", dtype=torch.float64)
    hard.load_state_dict(module.state_dict())
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    options = {"pool_types": ("avg", "max"), "gate_kind": "hard-sigmoid"}
    torch.testing.assert_close(hard(x), naive.cbam(x, **weights(hard), **options))
    assert hard.channel_att.gate == hard.spatial_att.gate == "hard-sigmoid"


@pytest.mark.parametrize(
    ("channels", "ratio", "preset", "hidden"),
    [(64, 16, None, 4), (8, 16, None, 1), (1, 16, "official", 1), (24, 16, None, 1), (24, 16, "timm", 2),
     (40, 16, "timm", 3), (100, 8, "official", 12)],
)
def test_hidden_width(channels, ratio, preset, hidden):
    """Floor of C / r (paper, official) or round-half-up (timm), never 0."""
    module = cbam.CBAM(channels, ratio, preset=preset)
    assert module.channel_att.hidden_channels == hidden
    assert module.channel_att.fc1.weight.shape == (hidden, channels)
    assert module(torch.randn(1, channels, 3, 3)).shape == (1, channels, 3, 3)


@pytest.mark.parametrize("kernel", [1, 3, 5, 9, 11])
def test_any_odd_kernel_keeps_the_size(kernel):
    module = cbam.CBAM(16, kernel_size=kernel)
    assert module.spatial_att.conv.weight.shape == (1, 2, kernel, kernel)
    assert module(torch.randn(2, 16, 6, 7)).shape == (2, 16, 6, 7)


@pytest.mark.parametrize(
    ("preset", "overrides", "bias", "norm", "momentum"),
    [(None, {}, False, False, None), ("timm", {}, False, True, 0.1), ("official", {}, True, True, 0.01),
     ("official", {"mlp_bias": False}, False, True, 0.01), (None, {"spatial_norm": True}, False, True, 0.1)],
)
def test_presets_and_explicit_overrides(preset, overrides, bias, norm, momentum):
    module = cbam.CBAM(32, preset=preset, **overrides)
    assert (module.channel_att.fc1.bias is not None) == bias
    assert (module.spatial_att.bn is not None) == norm
    if norm:
        assert module.spatial_att.bn.momentum == momentum


def test_state_dict_keys():
    assert set(cbam.CBAM(32).state_dict()) == {"channel_att.fc1.weight", "channel_att.fc2.weight",
                                               "spatial_att.conv.weight"}
    bn = {f"spatial_att.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    linear = {f"channel_att.fc{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    assert set(cbam.CBAM(32, preset="official").state_dict()) == linear | {"spatial_att.conv.weight"} | bn


def test_reset_parameters_is_he_init_fan_out():
    torch.manual_seed(0)
    module = cbam.CBAM(2048, 16, preset="official")
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(3.0)
    module.reset_parameters()
    fc1, fc2 = module.channel_att.fc1, module.channel_att.fc2
    for fc in (fc1, fc2):
        fan_out = fc.weight.shape[0]
        assert fc.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
        assert fc.weight.mean().abs().item() < 0.01
        assert (fc.bias == 0).all()
    bn = module.spatial_att.bn
    assert bn.weight.item() == 1 and bn.bias.item() == 0
    assert (module.spatial_att.conv.weight != 3.0).all()


def test_extra_repr_names_the_options():
    text = repr(cbam.CBAM(64, 8, 5, preset="official", pool_types=("avg", "lse"), gate="hard-sigmoid"))
    for piece in ("in_channels=64", "reduction_ratio=8", "hidden_channels=8", "('avg', 'lse')",
                  "kernel_size=5", "'hard-sigmoid'", "impl='auto'", "BatchNorm2d"):
        assert piece in text


def test_factory_kwargs():
    module = cbam.CBAM(32, preset="timm", dtype=torch.float64)
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    meta = cbam.CBAM(32, preset="timm", device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


@pytest.mark.parametrize("preset", [None, "official"])
def test_empty_batch_passes_through(preset):
    module = cbam.CBAM(16, preset=preset).train()
    before = copy.deepcopy(module.state_dict())
    out = module(torch.randn(0, 16, 5, 5))
    assert out.shape == (0, 16, 5, 5)
    for key, value in module.state_dict().items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(value, before[key])


def test_channels_last_input():
    module = make("timm", 2, dtype=torch.float32).eval()
    x = torch.randn(2, 12, 6, 5)
    out = module(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, module(x))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("preset", [None, "timm"])
def test_autocast_bfloat16_is_close_to_float32(preset):
    module = make(preset, 2, channels=64, kernel=7, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.1)
    x = torch.randn(2, 64, 14, 14)
    want = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(x)
    assert torch.isfinite(got).all()
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("impl", ["reference", "auto", "fused"])
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("preset", [None, "official"])
@pytest.mark.parametrize(("autocast", "dtype"), [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_half_input_of_the_other_half_type_under_cpu_autocast(autocast, dtype, preset, dims, impl):
    """CPU autocast's ``cat``/``stack`` refuse a half dtype other than its own, which crashed the reference's
    pooling. The output and input gradient keep ``x``'s dtype and stay close to the naive float64 CBAM."""
    module = make(preset, dims, dtype=torch.float32, impl=impl).eval()
    x = torch.randn(shape(dims)).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=autocast):
        got = module(x)
    grad = torch.randn(got.shape, dtype=torch.float64)
    got.backward(grad.to(dtype))
    x64 = x.detach().double().requires_grad_()
    bn = module.double().spatial_att.bn
    norm = None if bn is None else (
        lambda z: naive.batch_norm_eval(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps))
    want = naive.cbam(x64, **weights(module), norm=norm, pool_types=module.channel_att.pool_types)
    want.backward(grad)
    assert got.dtype == x.grad.dtype == dtype
    for half, exact in [(got, want), (x.grad, x64.grad)]:
        assert ((half.double() - exact).norm() / exact.norm()).item() < 2e-2


def test_torch_compile_matches_eager():
    module = make("official", 2, channels=32, kernel=7, dtype=torch.float32).eval()
    x = torch.randn(2, 32, 9, 9)
    compiled = torch.compile(module)
    torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)


def test_works_as_a_timm_attn_layer_signature():
    """timm builds attention layers as ``attn_layer(channels, device=..., dtype=...)``."""
    module = cbam.CBAM(64, device=None, dtype=None)
    assert isinstance(module, nn.Module) and module(torch.randn(1, 64, 4, 4)).shape == (1, 64, 4, 4)


@pytest.mark.parametrize("impl", ["auto", "fused"])
@pytest.mark.parametrize("part", ["channel_att", "spatial_att", "spatial_att.bn"])  # what the reference calls
def test_hooks_on_cbams_parts_see_each_call_once_and_take_effect(impl, part):
    """The fused path calls none of CBAM's parts, so a hook on one sends the call down the reference path
    (also under impl="fused"), and the calibration's timing runs never call it."""
    torch.manual_seed(0)
    module = cbam.CBAM(16, 4, preset="timm", impl=impl)
    x = torch.randn(2, 16, 6, 6)
    seen = []
    module.get_submodule(part).register_forward_hook(lambda m, inputs, output: seen.append(output) or output * 0)
    out = module(x)
    assert len(seen) == 1 and not module.fuses(x)
    reference = cbam.CBAM(16, 4, preset="timm", impl="reference")
    reference.load_state_dict(module.state_dict())
    reference.get_submodule(part).register_forward_hook(lambda m, inputs, output: output * 0)
    torch.testing.assert_close(out, reference(x))
