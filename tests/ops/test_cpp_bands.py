"""The C++ one-call forward takes a sample too large for its cache budget (256 KiB) in bands of positions:
each band's gated statistics, then the rows of logits and outputs they complete. Where threads take whole
samples (a batch of at least as many samples as threads) it bands; a batch of one sample runs the same
passes over the whole sample, in parallel. Both compute each element with the same operations, so a
batch's results equal those of its samples run one at a time, bit for bit, whatever the bands."""

import pytest
import torch
from torch import nn

import cbam
from cbam.ops import engines
from cbam.ops.engines import cpp

pytestmark = pytest.mark.skipif(cpp.engine() is None, reason="the C++ engine did not build here")

NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# (channels, spatial size, kernel): several bands on AVX2 and AVX-512 alike (> 256 KiB per sample); a 3-D
# map, whose logits wait for the next plane; a 1-D map, one row that the last band completes.
SHAPES = [(96, (30, 45), 7), (64, (6, 12, 20), 3), (128, (1000,), 7)]


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    with engines.using("cpp"):
        yield
    torch.set_num_threads(threads)


def randomised(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        for name, buffer in module.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2, generator=gen)
            elif name.endswith("running_mean"):
                buffer.normal_(generator=gen)
    return module


def one_at_a_time(call, *batches):
    """``call`` on each sample of the batches alone (one sample: the passes run over the whole of it)."""
    return torch.cat([call(*(t[b:b + 1] if t is not None else None for t in batches)) for b in range(len(batches[0]))])


@pytest.mark.parametrize(("channels", "size", "kernel"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tail", ["none", "residual", "residual, folded norm, in place"])
def test_banded_inference_equals_whole_samples(channels, size, kernel, dtype, tail):
    dims = len(size)
    module = randomised(cbam.CBAM(channels, 4, kernel, dims=dims, preset="timm", dtype=dtype), seed=0).eval()
    norm = randomised(NORMS[dims](channels, dtype=dtype), seed=1).eval() if "norm" in tail else None
    x = torch.randn(3, channels, *size, dtype=dtype)
    residual = torch.randn_like(x) if "residual" in tail else None

    def call(x, residual):
        return module(x.clone(), residual, norm, inplace="in place" in tail)

    with torch.no_grad():
        assert x[0].numel() * x.element_size() > 256 * 1024  # the sample outgrows the band budget
        torch.testing.assert_close(call(x, residual), one_at_a_time(call, x, residual), rtol=0, atol=0)


@pytest.mark.parametrize(("channels", "size", "kernel"), SHAPES[:2])
def test_banded_training_forward_equals_whole_samples(channels, size, kernel):
    """Without a spatial BatchNorm the training forward bands too (and tracks the arg-maxima): the same
    output bits as one sample at a time, and the same gradients (to rounding: the backward of a batch
    sums in another order than that of one sample)."""
    module = randomised(cbam.CBAM(channels, 4, kernel, dims=len(size), dtype=torch.float64), seed=0)
    x, upstream = torch.randn(2, 2, channels, *size, dtype=torch.float64)

    def outputs_and_grads(x, upstream):
        leaf = x.detach().requires_grad_()
        out = module(leaf)
        return [out, *torch.autograd.grad(out, [leaf, *module.parameters()], upstream)]

    batched = outputs_and_grads(x, upstream)
    singles = [outputs_and_grads(x[b:b + 1], upstream[b:b + 1]) for b in range(2)]
    torch.testing.assert_close(batched[0], torch.cat([s[0] for s in singles]), rtol=0, atol=0)
    torch.testing.assert_close(batched[1], torch.cat([s[1] for s in singles]))
    torch.testing.assert_close(batched[2:], [sum(s[i] for s in singles) for i in range(2, len(batched))])


@pytest.mark.parametrize(("channels", "size", "kernel"), SHAPES)
def test_banded_inference_equals_the_float64_reference(channels, size, kernel):
    module = randomised(cbam.CBAM(channels, 4, kernel, dims=len(size), preset="timm", dtype=torch.float64), seed=0)
    reference = randomised(cbam.CBAM(channels, 4, kernel, dims=len(size), preset="timm", impl="reference",
                                     dtype=torch.float64), seed=0)
    x, residual = torch.randn(2, channels, *size, dtype=torch.float64), torch.randn(2, channels, *size,
                                                                                  dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x, residual), reference.eval()(x, residual))
