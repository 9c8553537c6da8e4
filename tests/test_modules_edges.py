"""The modules, variants, functional API and validation at their edges: each test pins one bug an audit found."""

import pytest
import torch

import cbam
from cbam import functional


@pytest.mark.parametrize("build", [
    lambda: cbam.ParallelCBAM(16, preset="timm"),
    lambda: cbam.ParallelCBAM(16, preset="timm", combine="logits"),
    lambda: cbam.DynamicCBAM(16, preset="timm"),
])
def test_variants_keep_the_input_dtype_when_the_gate_is_wider(monkeypatch, build):
    """CUDA autocast runs ``sum`` in float32, so the channel MLP's result and gate are float32 for bfloat16
    input; emulated by a float32 channel MLP under CPU autocast. As ``CBAM`` (timm too), the output keeps
    bfloat16 and stays close to the float32 module's."""
    module = build().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 16, 5, 5)
    want = module(x)
    real = functional.channel_mlp
    monkeypatch.setattr(functional, "channel_mlp", lambda *args, **kwargs: real(*args, **kwargs).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.attention(x.bfloat16()).channel.dtype == torch.float32
        got = module(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


def test_light_cbam_with_options_left_as_none_is_light():
    """``None`` means "not given" everywhere: ``LightCBAM(C, pool_types=None, spatial_pool=None)`` is the
    documented light form (one pooled descriptor per gate), not a full CBAM."""
    module = cbam.LightCBAM(16, pool_types=None, spatial_pool=None)
    assert module.channel_att.pool_types == ("mix",) and module.spatial_att.pool == "mix"
    assert module.spatial_att.conv.weight.shape == (1, 1, 7, 7)


@pytest.mark.parametrize("pools", [[["avg"]], [{"avg"}]])
def test_unhashable_pool_types_get_the_pool_types_message(pools):
    with pytest.raises(ValueError, match=r"pool_types must be a non-empty sequence of distinct names .* got"):
        cbam.CBAM(16, pool_types=pools)


@pytest.mark.parametrize("call", [
    lambda x: functional.pool(x, "avg"),
    lambda x: functional.spatial_pool(x),
])
def test_functional_pools_refuse_inputs_without_spatial_dims(call):
    """A ``(B, C)`` input used to be reduced over every dim (a scalar) or pooled into ``(B, 2)``."""
    with pytest.raises(ValueError, match=r"at least 3 dims, got shape \(2, 16\)"):
        call(torch.randn(2, 16))


@pytest.mark.parametrize("conv", [torch.randn(1, 2, 4, 4), [torch.randn(1, 2, 1, 1), torch.randn(1, 1, 3, 2)]])
def test_functional_spatial_gate_refuses_even_kernels(conv):
    """Padding ``k // 2`` keeps the size only for odd kernels: an even one used to return logits
    ``(B, 1, H + 1, W + 1)`` silently (and ``functional.cbam`` failed on a broadcast)."""
    with pytest.raises(ValueError, match=r"odd kernel.*\(1, (2, 4, 4|1, 3, 2)\)"):
        functional.spatial_attention_logits(torch.randn(2, 8, 5, 6), conv)


def test_dynamic_cbam_temperature_of_the_wrong_kind_is_a_type_error():
    with pytest.raises(TypeError, match=r"temperature must be a positive number, got '1' \(str\)"):
        cbam.DynamicCBAM(16, temperature="1")
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        cbam.DynamicCBAM(16, temperature=0)


def test_dynamic_cbam_puts_every_tensor_on_the_factory_device():
    """``width_masks`` was made on the CPU whatever ``device`` said (on CUDA, the forward's matmul failed)."""
    module = cbam.DynamicCBAM(16, device="meta")
    assert {t.device.type for t in (*module.parameters(), *module.buffers())} == {"meta"}


def test_dynamic_cbam_meta_init_then_reset_parameters_computes_as_an_eager_one():
    """The meta-device flow (build on ``meta``, ``to_empty``, ``reset_parameters``) must leave no buffer
    uninitialised: ``width_masks`` kept ``to_empty``'s garbage, so the hidden units were scaled by it."""
    eager = cbam.DynamicCBAM(16, reduction_ratios=(2, 4, 8), preset="official", dtype=torch.float64)
    module = cbam.DynamicCBAM(16, reduction_ratios=(2, 4, 8), preset="official", device="meta", dtype=torch.float64)
    module.to_empty(device="cpu")
    module.reset_parameters()
    widths = torch.arange(8)
    want = torch.stack([(widths < h).double() for h in (8, 4, 2)])  # nested widths C // r
    torch.testing.assert_close(module.width_masks, want, rtol=0, atol=0)
    module.load_state_dict(eager.state_dict())
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(module.eval()(x), eager.eval()(x))
