"""Every bad input gets a TypeError/ValueError whose message names what was expected and what came."""

import pytest
import torch

import cbam
from cbam import functional

BAD_CONSTRUCTORS = [
    # (build, error, words the message must contain)
    (lambda: cbam.CBAM(0), ValueError, ["in_channels", ">= 1", "got 0"]),
    (lambda: cbam.CBAM(-4), ValueError, ["in_channels", "got -4"]),
    (lambda: cbam.CBAM("64"), TypeError, ["in_channels", "int", "'64'", "str"]),
    (lambda: cbam.CBAM(64.0), TypeError, ["in_channels", "int", "64.0", "float"]),
    (lambda: cbam.CBAM(True), TypeError, ["in_channels", "True", "bool"]),
    (lambda: cbam.CBAM(64, 0), ValueError, ["reduction_ratio", ">= 1", "got 0"]),
    (lambda: cbam.ChannelAttention(64, -2), ValueError, ["reduction_ratio", "got -2"]),
    (lambda: cbam.CBAM(64, kernel_size=4), ValueError, ["kernel_size", "odd", "got 4"]),
    (lambda: cbam.SpatialAttention(0), ValueError, ["kernel_size", ">= 1", "got 0"]),
    (lambda: cbam.SpatialAttention(-3), ValueError, ["kernel_size", "got -3"]),
    (lambda: cbam.SpatialAttention(3.0), TypeError, ["kernel_size", "int", "3.0"]),
    (lambda: cbam.CBAM(64, pool_types=("avg", "mean")), ValueError, ["pool_types", "'lse'", "'mean'"]),
    (lambda: cbam.CBAM(64, pool_types=()), ValueError, ["pool_types", "non-empty", "()"]),
    (lambda: cbam.CBAM(64, pool_types=("max", "max")), ValueError, ["pool_types", "distinct", "('max', 'max')"]),
    (lambda: cbam.CBAM(64, pool_types="avg"), TypeError, ["pool_types", "sequence", "'avg' (str)"]),
    (lambda: cbam.CBAM(64, preset="keras"), ValueError, ["preset", "'timm'", "'official'", "'keras'"]),
    (lambda: cbam.CBAM(64, preset=1), TypeError, ["preset", "'timm'", "1 (int)"]),
    (lambda: cbam.CBAM(64, gate="relu"), ValueError, ["gate", "'sigmoid'", "'hard-sigmoid'", "'relu'"]),
    (lambda: cbam.SpatialAttention(gate=torch.sigmoid), TypeError, ["gate", "'sigmoid'", "function"]),
    (lambda: cbam.CBAM(64, dims=0), ValueError, ["dims", ">= 1", "got 0"]),
    (lambda: cbam.CBAM(64, dims=4), ValueError, ["dims", "1, 2, 3", "got 4"]),
    (lambda: cbam.CBAM(64, impl="cuda"), ValueError, ["impl", "'reference'", "'cuda'"]),
    (lambda: cbam.CBAM(64, mlp_bias=1), TypeError, ["mlp_bias", "True or False", "1 (int)"]),
    (lambda: cbam.CBAM(64, spatial_norm="yes"), TypeError, ["norm", "True or False", "'yes'"]),
]


@pytest.mark.parametrize(("build", "error", "words"), BAD_CONSTRUCTORS)
def test_bad_constructor_arguments(build, error, words):
    with pytest.raises(error) as caught:
        build()
    for word in words:
        assert word in str(caught.value)


BAD_INPUTS = [
    # (module, input, error, words the message must contain)
    (cbam.CBAM(64), [[1.0]], TypeError, ["CBAM", "torch.Tensor", "list"]),
    (cbam.CBAM(64), torch.ones(2, 64, 4, 4, dtype=torch.long), TypeError, ["floating", "torch.int64"]),
    (cbam.CBAM(64), torch.randn(16, 5, 5), ValueError, ["CBAM(in_channels=64, dims=2)", "4-D", "(B, C, H, W)",
                                                       "(16, 5, 5)"]),
    (cbam.CBAM(8, dims=3), torch.randn(2, 8, 4, 4), ValueError, ["5-D", "(B, C, D, H, W)", "(2, 8, 4, 4)"]),
    (cbam.ChannelAttention(8, dims=1), torch.randn(2, 8, 4, 4), ValueError, ["ChannelAttention", "3-D",
                                                                           "(B, C, L)", "(2, 8, 4, 4)"]),
    (cbam.CBAM(64), torch.randn(2, 32, 8, 8), ValueError, ["64 channels", "got 32", "(2, 32, 8, 8)"]),
    (cbam.ChannelAttention(64), torch.randn(2, 32, 8, 8), ValueError, ["64 channels", "got 32"]),
    (cbam.CBAM(64), torch.randn(2, 64, 0, 8), ValueError, ["non-empty spatial", "(2, 64, 0, 8)"]),
    (cbam.SpatialAttention(), torch.randn(2, 0, 8, 8), ValueError, ["SpatialAttention", "at least 1 channel",
                                                                    "(2, 0, 8, 8)"]),
    (cbam.SpatialAttention(), torch.randn(2, 3, 8), ValueError, ["4-D", "(2, 3, 8)"]),
]


@pytest.mark.parametrize(("module", "x", "error", "words"), BAD_INPUTS)
def test_bad_inputs(module, x, error, words):
    for call in (module, module.attention):
        with pytest.raises(error) as caught:
            call(x)
        for word in words:
            assert word in str(caught.value)


def test_functional_checks_its_inputs_too():
    w1, w2, conv = torch.randn(2, 8), torch.randn(8, 2), torch.randn(1, 2, 3, 3)
    with pytest.raises(TypeError, match="cbam.functional.*floating.*torch.int32"):
        functional.cbam(torch.ones(1, 8, 4, 4, dtype=torch.int32), w1, w2, conv)
    with pytest.raises(ValueError, match="expects 8 channels at dim 1, got 6"):
        functional.channel_attention(torch.randn(1, 6, 4, 4), w1, w2)
    with pytest.raises(ValueError, match=r"4-D input .* got shape \(1, 8, 4, 4, 4\)"):
        functional.spatial_attention(torch.randn(1, 8, 4, 4, 4), conv)
    with pytest.raises(ValueError, match="pool_types.*'median'"):
        functional.pool(torch.randn(1, 8, 4, 4), "median")
    with pytest.raises(ValueError, match="gate.*'tanh'"):
        functional.gate(torch.randn(3), "tanh")


def test_integer_like_arguments_are_accepted():
    """The tutorial's DynamicCBAM passes 0-d int tensors; anything with __index__ is an int."""
    module = cbam.CBAM(torch.tensor(32), torch.tensor(8, dtype=torch.int32), torch.tensor(5))
    assert module.channel_att.hidden_channels == 4 and module.spatial_att.kernel_size == 5
