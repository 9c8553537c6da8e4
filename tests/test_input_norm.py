"""``cbam(x, residual, input_norm=bn)``: the BatchNorm before CBAM, folded into the fused passes (in
inference and in training, with torch's running-statistics updates and BatchNorm backward) and
applied first where it cannot fold, always computing ``cbam(bn(x))``."""

import copy
import re

import pytest
import torch
from torch import nn

import cbam
from cbam.ops import folds_input_norm, fused_cbam
from cbam.ops.engines import cpp
from layouts import laid_out

F64 = torch.float64
NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
needs_compiled = pytest.mark.skipif(cpp.engine() is None, reason="the C++ engine did not build here")


def randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with random parameters and BatchNorm statistics (running variances in [0.5, 2])."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                mean, var = m.running_mean, m.running_var
                mean.copy_(torch.randn(mean.shape, generator=gen, dtype=mean.dtype))
                var.copy_(torch.rand(var.shape, generator=gen, dtype=var.dtype) * 1.5 + 0.5)
    return module


class CountingCalls:
    """Counts ``F.batch_norm`` calls on a given input tensor (the BatchNorm before CBAM run as a module)."""

    def __init__(self, monkeypatch, x: torch.Tensor):
        self.calls, original = 0, torch.nn.functional.batch_norm

        def counted(input, *args, **kwargs):
            self.calls += input is x
            return original(input, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "batch_norm", counted)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("dims", "shape", "preset"), [
    (2, (3, 16, 9, 10), "timm"), (2, (2, 16, 5, 7), "official"), (2, (2, 16, 6, 6), None),
    (1, (2, 16, 13), "timm"), (3, (2, 16, 3, 4, 5), "official"),
    (2, (2, 64, 2, 2), "timm"),  # MLP weights outweigh a sample: the C++ forward pools every sample first
])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_folded_norm_computes_the_norm_applied_first(monkeypatch, dtype, dims, shape, preset, with_residual, affine,
                                                     layout):
    """In eval mode without autograd the BatchNorm is never called as a module, and the result has the
    same bits as CBAM of the BatchNorm's output (the C++ passes round its map as torch's kernel does;
    torch's generic kernel for a channels-last 1-D batch, a transposed view, rounds otherwise)."""
    module = randomised(cbam.CBAM(shape[1], 2, 3, dims=dims, preset=preset, dtype=dtype)).eval()
    norm = randomised(NORMS[dims](shape[1], affine=affine, dtype=dtype), seed=1).eval()
    x = laid_out(torch.randn(shape, dtype=dtype) * 2, layout)
    residual = laid_out(torch.randn(shape, dtype=dtype), layout) if with_residual else None
    counter = CountingCalls(monkeypatch, x)
    with torch.no_grad():
        assert folds_input_norm(norm, x, *module._fused_inputs())
        folded = module(x, residual, input_norm=norm)
        assert counter.calls == 0
        applied_first = module(norm(x), residual)
        assert counter.calls == 1
    if layout == "channels_last" and dims == 1:
        torch.testing.assert_close(folded, applied_first)
    else:
        assert torch.equal(folded, applied_first)
    if with_residual:
        assert 0.1 < (folded == 0).double().mean().item() < 0.9  # the ReLU cuts a share of the sums


def test_reference_impl_applies_the_norm_first():
    module = randomised(cbam.CBAM(8, 2, 3, preset="timm", impl="reference", dtype=F64)).eval()
    norm = randomised(nn.BatchNorm2d(8, dtype=F64), seed=1).eval()
    x, residual = torch.randn(2, 8, 5, 6, dtype=F64), torch.randn(2, 8, 5, 6, dtype=F64)
    torch.testing.assert_close(module(x, residual, input_norm=norm), torch.relu(module(norm(x)) + residual))


def _hooked(norm: nn.Module) -> nn.Module:
    norm.register_forward_hook(lambda module, inputs, output: setattr(module, "seen", output))
    return norm


def _outputs_grads_buffers(module, norm, x, residual, upstream, fold: bool, steps: int = 2):
    """Per step the output and the gradients for ``x``, the residual, CBAM's and the norm's parameters;
    then the norm's buffers. ``fold`` passes the norm to CBAM, else applies it first."""
    found = []
    for _ in range(steps):
        leaves = [x.clone().requires_grad_(), residual.clone().requires_grad_()]
        out = module(leaves[0], leaves[1], input_norm=norm) if fold else module(norm(leaves[0]), leaves[1])
        found += [out, *torch.autograd.grad(out, [*leaves, *module.parameters(), *norm.parameters()], upstream)]
    return found + list(norm.buffers())


@needs_compiled
@pytest.mark.parametrize("case", ["train mode", "momentum None", "no running statistics", "no affine",
                                  "eval mode with autograd"])
@pytest.mark.parametrize("preset", ["timm", "official", None])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_folded_norm_trains_like_the_norm_applied_first(case, preset, dtype, layout):
    """With autograd, on batch or running statistics: outputs, every gradient (the norm's weight and
    bias included) and the running statistics after two steps equal those with the module run first
    in float64. On running statistics the map is rounded as torch's kernel rounds it, so float32 is
    bitwise the module run first in float32; batch statistics come from the pooling pass (sums in
    double) and the backward from sums the passes take, so float32 is about as close to float64 as
    the module run first in float32 is (within 10x its error, or 1e-5 of the largest value: a spatial
    BatchNorm's bias gradient is one sum with much cancellation)."""
    options = {"momentum None": {"momentum": None}, "no running statistics": {"track_running_stats": False},
               "no affine": {"affine": False}}.get(case, {})
    module = randomised(cbam.CBAM(16, 4, 3, preset=preset, dtype=dtype)).train()
    norm = randomised(nn.BatchNorm2d(16, dtype=dtype, **options), seed=1).train(case != "eval mode with autograd")
    gen = torch.Generator().manual_seed(2)
    x, residual, upstream = (laid_out(torch.randn(3, 16, 6, 7, generator=gen, dtype=dtype), layout) for _ in range(3))
    x = x * 2
    assert folds_input_norm(norm, x, *module._fused_inputs())
    run = [copy.deepcopy(m) for m in (module, norm, module, norm)]
    folded = _outputs_grads_buffers(run[0], run[1], x, residual, upstream, fold=True)
    applied_first = _outputs_grads_buffers(run[2], run[3], x, residual, upstream, fold=False)
    exact = _outputs_grads_buffers(module.double(), norm.double(), x.double(), residual.double(), upstream.double(),
                                   fold=False)
    if dtype == F64:
        torch.testing.assert_close(folded, exact, rtol=1e-12, atol=1e-14)
    elif case == "eval mode with autograd":
        torch.testing.assert_close(folded, applied_first, rtol=0, atol=0)
    else:
        for ours, torchs, truth in zip(folded, applied_first, exact, strict=True):
            error, torch_error = ((t.double() - truth).abs().max().item() for t in (ours, torchs))
            assert error <= 10 * torch_error + 1e-5 * truth.abs().max().item()


def test_reference_impl_applies_the_norm_first_in_training():
    module = randomised(cbam.CBAM(8, 2, 3, preset="timm", impl="reference", dtype=F64)).train()
    norms = [randomised(nn.BatchNorm2d(8, dtype=F64), seed=1) for _ in range(2)]
    x, residual = torch.randn(2, 8, 5, 6, dtype=F64), torch.randn(2, 8, 5, 6, dtype=F64)
    upstream = torch.randn_like(x)
    torch.testing.assert_close(_outputs_grads_buffers(module, norms[0], x, residual, upstream, fold=True),
                               _outputs_grads_buffers(module, norms[1], x, residual, upstream, fold=False))


@pytest.mark.parametrize("case", ["hooked", "not a BatchNorm", "a BatchNorm subclass", "another dtype"])
def test_norm_that_cannot_fold_is_applied_first(case):
    """Where folding would skip what torch does (hooks, another module's forward) or cannot compute it
    (another dtype) the module runs first; outputs, gradients and buffers equal the unfused order."""
    make_norm = {
        "hooked": lambda: _hooked(nn.BatchNorm2d(8, dtype=F64)),
        "not a BatchNorm": lambda: nn.GroupNorm(2, 8, dtype=F64),
        "a BatchNorm subclass": lambda: type("Scaled", (nn.BatchNorm2d,), {
            "forward": lambda self, x: 2 * nn.BatchNorm2d.forward(self, x)})(8, dtype=F64),
        "another dtype": lambda: nn.BatchNorm2d(8, dtype=torch.float32),
    }[case]
    module = randomised(cbam.CBAM(8, 2, 3, preset="official", dtype=F64)).train()
    norms = [randomised(make_norm(), seed=1), randomised(make_norm(), seed=1)]
    x, residual = torch.randn(2, 8, 5, 6, dtype=F64), torch.randn(2, 8, 5, 6, dtype=F64)
    assert not folds_input_norm(norms[0], x, *module._fused_inputs())
    if case == "another dtype":  # torch's own BatchNorm refuses the mix; so must the folded call
        with pytest.raises(RuntimeError):
            norms[1](x)
        with pytest.raises(RuntimeError):
            module(x, residual, input_norm=norms[0])
        return
    upstream = torch.randn_like(x)
    torch.testing.assert_close(_outputs_grads_buffers(module, norms[0], x, residual, upstream, fold=True),
                               _outputs_grads_buffers(module, norms[1], x, residual, upstream, fold=False),
                               rtol=0, atol=0)
    if case == "hooked":
        assert torch.equal(norms[0].seen, norms[1].seen)


def test_one_value_per_channel_in_training_fails_as_torch_does():
    module, norm = cbam.CBAM(8), nn.BatchNorm2d(8)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        module(torch.randn(1, 8, 1, 1), input_norm=norm)


def test_norm_of_other_channels_fails_as_torch_does():
    """A BatchNorm that does not match the input is never folded: torch's own error, not a bad read."""
    module, norm = cbam.CBAM(8).eval(), nn.BatchNorm2d(5).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="running_mean should contain 8 elements not 5"):
        module(torch.randn(2, 8, 5, 6), input_norm=norm)


def test_input_norm_must_be_callable():
    with pytest.raises(TypeError, match=re.escape("input_norm must be a callable (a module such as nn.BatchNorm2d), "
                                                  "got 3 (int)")):
        cbam.CBAM(8)(torch.randn(2, 8, 5, 6), input_norm=3)


def test_fused_function_refuses_a_norm_it_cannot_fold():
    """Called directly, the fused function checks what ``CBAM.forward`` checks before folding: a norm of
    other channels would otherwise be read out of bounds."""
    module = cbam.CBAM(8).eval()
    with pytest.raises(ValueError, match=r"cannot fold input_norm=BatchNorm2d\(5, .* shape \(2, 8, 5, 6\)"):
        fused_cbam(torch.randn(2, 8, 5, 6), *module._fused_inputs(), input_norm=nn.BatchNorm2d(5))


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("length", [1, 5, 16, 49, 100])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_statistics_come_with_the_pooling(dtype, length, layout):
    """``batch_norm_pool``, one read of x: the batch's mean, biased variance and ``1 / sqrt(var + eps)``
    (float64 truth), and CBAM's pooling of the BatchNorm's output; a negative weight makes
    each row's minimum its maximum, a zero one makes every position the first maximum. Values far
    from zero keep the variance exact (sums run about a value of the channel). 42 channels: whole vectors
    of channels and a rest, channels-last."""
    gen = torch.Generator().manual_seed(length)
    x = laid_out((torch.randn(3, 42, length, generator=gen, dtype=F64) * 0.01 + 1000).to(dtype), layout)
    weight = torch.tensor([1.5, -2.0, 0.0, 1.0, -0.5, 3.0], dtype=dtype).repeat(7)
    bias = torch.randn(42, generator=gen, dtype=dtype)
    avg, peak, index, mean, var, invstd, affine = cpp.engine().batch_norm_pool(x, weight, bias, 1e-5)
    true_var, true_mean = torch.var_mean(x.double(), dim=(0, 2), correction=0)
    tolerance = {"rtol": 1e-6 if dtype == torch.float32 else 1e-9, "atol": 0}  # the truth's own error: ~1e-11
    torch.testing.assert_close(mean.double(), true_mean, **tolerance)
    torch.testing.assert_close(var.double(), true_var, **tolerance)
    torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(true_var + 1e-5), **tolerance)
    torch.testing.assert_close(affine[0], invstd * weight, rtol=0, atol=0)
    torch.testing.assert_close(affine[1], bias - mean * affine[0])  # one rounding fewer where contracted
    normed = torch.addcmul(affine[1].view(1, 42, 1), x, affine[0].view(1, 42, 1))
    torch.testing.assert_close(avg, normed.mean(2))
    torch.testing.assert_close(peak, normed.amax(2), rtol=0, atol=0)
    torch.testing.assert_close(normed.gather(2, index.unsqueeze(2)).squeeze(2), peak, rtol=0, atol=0)
    negative, zero = weight < 0, weight == 0
    torch.testing.assert_close(index[:, negative], x[:, negative].argmin(2))
    assert index[:, zero].eq(0).all()
