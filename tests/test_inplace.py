"""``cbam(x, ..., inplace=True)``: the fused inference path writes its output over ``x``; nowhere else
is ``x`` touched, and ResNet blocks never overwrite a tensor a hook kept."""

from functools import partial

import pytest
import torch
from torch import nn

import cbam
from cbam.models.resnet import Bottleneck
from cbam.ops.engines import cpp

needs_compiled = pytest.mark.skipif(cpp.engine() is None, reason="the C++ engine did not build here")


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return module


@needs_compiled
@pytest.mark.parametrize("with_norm", [False, True])
def test_inference_output_overwrites_the_input(with_norm):
    module = randomised(cbam.CBAM(16, 4, preset="timm")).eval()
    norm = randomised(nn.BatchNorm2d(16), seed=1).eval() if with_norm else None
    x, residual = torch.randn(2, 16, 7, 9), torch.randn(2, 16, 7, 9)
    with torch.no_grad():
        want = module(x if norm is None else norm(x), residual)
        kept = x.clone()
        got = module(x, residual, norm, inplace=True)
    assert got.data_ptr() == x.data_ptr() and not torch.equal(x, kept)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["autograd", "norm applied first", "reference impl"])
def test_input_is_kept_where_the_output_cannot_overwrite_it(case):
    """With a backward to come (x is saved), or where ``x`` went through a norm whose hooks may keep
    its output, or off the fused path, ``inplace`` changes nothing."""
    module = randomised(cbam.CBAM(16, 4, preset="timm", impl="reference" if case == "reference impl" else "auto"))
    norm = randomised(nn.BatchNorm2d(16), seed=1).eval()
    seen = []
    norm.register_forward_hook(lambda m, inputs, output: seen.append(output.clone()))
    x = torch.randn(2, 16, 7, 9, requires_grad=case == "autograd")
    kept = x.detach().clone()
    with torch.set_grad_enabled(case == "autograd"):
        got = module.eval()(x, input_norm=norm if case != "autograd" else None, inplace=True)
    assert torch.equal(x.detach(), kept) and got.data_ptr() != x.data_ptr()
    if case == "norm applied first":
        assert torch.equal(seen[0], norm(kept))


def test_block_keeps_what_a_hook_on_its_last_conv_holds():
    block = randomised(Bottleneck(64, 16, 1, partial(cbam.CBAM, reduction_ratio=4, preset="timm"))).eval()
    kept = []
    block.conv3.register_forward_hook(lambda m, inputs, output: kept.append((inputs[0].clone(), output)))
    with torch.no_grad():
        block(torch.randn(2, 64, 8, 8))
        (conv_input, conv_output), = kept
        assert torch.equal(conv_output, block.conv3(conv_input))


def test_inplace_must_be_a_bool():
    with pytest.raises(TypeError, match="inplace must be True or False, got 'yes'"):
        cbam.CBAM(8)(torch.randn(2, 8, 5, 6), inplace="yes")
