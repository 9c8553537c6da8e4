"""CBAM on the Triton engine (``CBAM_ENGINE=triton``; on the CPU through Triton's interpreter) against the
float64 reference: the output, the input gradient and every parameter gradient, with the residual tail
and the folded BatchNorm before CBAM in train and eval, both layouts, float32/bfloat16/float16 input,
on poisoned allocations (an unwritten element is NaN).

Tolerances: the gates, vectors and CBAM's parameter gradients are float32 sums of exactly widened
inputs (1e-4 relative); bfloat16/float16 outputs and input gradients are rounded once (2^-7, 2^-10
relative to the largest value, plus that rounding's share of the float32 steps), and so are the folded
BatchNorm's parameter gradients on running statistics (torch's BatchNorm backward of the rounded
CBAM input gradient).
"""

import pytest
import torch
from poison import poisoned
from torch import nn

import cbam
from cbam.ops import engine_for, engines

pytestmark = pytest.mark.skipif(engines.ENGINES["triton"].load() is None, reason="triton is not installed")

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.fixture(autouse=True)
def triton_engine():
    if DEVICE == "cuda":  # the reference's cuDNN conv uses TF32 by default: compare against float64, not it
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with engines.using("triton"):
        yield


def modules(channels, dims, preset, training, fold):
    """A fused CBAM (float32 parameters), its float64 twin and, with ``fold``, a BatchNorm before each."""
    torch.manual_seed(1)
    fused = cbam.CBAM(channels, 2, 3, dims=dims, preset=preset, impl="fused", device=DEVICE)
    norm = getattr(nn, f"BatchNorm{dims}d")(channels, device=DEVICE) if fold else None
    with torch.no_grad():
        for p in [*fused.parameters(), *([] if norm is None else norm.parameters())]:
            p.normal_(0, 0.7)
        for bn in [m for m in [fused.spatial_att.bn, norm] if m is not None]:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    twin = cbam.CBAM(channels, 2, 3, dims=dims, preset=preset, impl="reference", dtype=F64, device=DEVICE)
    twin.load_state_dict(fused.state_dict())
    twin_norm = None if norm is None else getattr(nn, f"BatchNorm{dims}d")(channels, dtype=F64, device=DEVICE)
    if norm is not None:
        twin_norm.load_state_dict(norm.state_dict())
    for m in (fused, twin, norm, twin_norm):
        if m is not None:
            m.train(training)
    return (fused, norm), (twin, twin_norm)


def run(pair, x, residual, upstream):
    """Output and gradients (input, residual, parameters) of ``cbam(norm(x), residual)``."""
    module, norm = pair
    leaves = [x.detach().requires_grad_(), None if residual is None else residual.detach().requires_grad_()]
    out = module(leaves[0], leaves[1], input_norm=norm)
    params = [*module.parameters(), *([] if norm is None else norm.parameters())]
    inputs = [leaf for leaf in leaves if leaf is not None]
    return [out, *torch.autograd.grad(out, [*inputs, *params], upstream)]


CASES = [  # (shape, dims, preset, dtype, layout, residual, fold, training)
    ((2, 5, 3, 7), 2, None, torch.float32, "contiguous", False, False, True),
    ((1, 37, 5, 5), 2, "timm", torch.float32, "channels_last", True, False, False),
    ((2, 6, 4, 5), 2, "official", torch.bfloat16, "channels_last", True, True, True),
    ((2, 6, 4, 5), 2, "timm", torch.float16, "contiguous", False, True, False),
    ((3, 5, 9), 1, None, torch.float32, "contiguous", True, True, True),
    ((2, 4, 3, 4, 5), 3, "timm", torch.bfloat16, "channels_last", False, False, True),
]


@pytest.mark.parametrize(("shape", "dims", "preset", "dtype", "layout", "residual", "fold", "training"), CASES)
def test_triton_cbam_equals_the_float64_reference(shape, dims, preset, dtype, layout, residual, fold, training):
    fused, twin = modules(shape[1], dims, preset, training, fold)
    torch.manual_seed(2)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    tail = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    upstream = torch.randn(shape, device=DEVICE).to(dtype)
    assert engine_for(x) == "triton"
    with poisoned():
        got = run(fused, x, tail, upstream)
    want = run(twin, x.double(), None if tail is None else tail.double(), upstream.double())
    assert got[0].dtype == dtype and got[1].dtype == dtype
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=x_format(dims)) and got[1].is_contiguous(memory_format=x_format(dims))
    folded_grads = 2 if fold else 0  # the folded BatchNorm's are sums of the input gradient, rounded to dtype
    for place, (found, expected) in enumerate(zip(got, want, strict=True)):
        scale = expected.abs().max().item()
        rounded = found.shape == x.shape or place >= len(got) - folded_grads
        rtol = TOLERANCE[dtype] if rounded else 1e-4
        torch.testing.assert_close(found.double(), expected, rtol=rtol, atol=2 * rtol * scale)
    norms = [(fused[0].spatial_att.bn, twin[0].spatial_att.bn), (fused[1], twin[1])]
    for found, expected in [pair for pair in norms if pair[0] is not None and training]:
        # the running statistics (the spatial BatchNorm's and the folded one's) moved as the modules' own forwards
        # move them, and counted once
        torch.testing.assert_close(found.running_mean.double(), expected.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(found.running_var.double(), expected.running_var, rtol=1e-5, atol=1e-6)
        assert found.num_batches_tracked.item() == expected.num_batches_tracked.item() == 1


def x_format(dims):
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def test_triton_auto_under_autocast_keeps_the_input_dtype():
    """``impl="auto"`` takes the Triton engine under autocast: bfloat16 in, bfloat16 out, gates in float32."""
    (fused, _), (twin, _) = modules(8, 2, "timm", False, False)
    fused.impl = "auto"
    x = torch.randn(2, 8, 5, 6, device=DEVICE).bfloat16()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert fused.fuses(x)
        got = fused(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), twin(x.double()), rtol=2**-7, atol=2**-7)


def test_a_single_logit_in_training_raises_torchs_error():
    """A spatial BatchNorm on batch statistics over one logit (batch 1, one position) fails as torch's
    BatchNorm does, on the Triton engine as on the reference, and leaves its running statistics alone."""
    (fused, _), (twin, _) = modules(8, 2, "timm", True, False)
    x = torch.randn(1, 8, 1, 1, device=DEVICE)
    before = fused.spatial_att.bn.running_mean.clone()
    for module in (fused, twin):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            module(x.to(next(module.parameters()).dtype))
    assert torch.equal(fused.spatial_att.bn.running_mean, before)
