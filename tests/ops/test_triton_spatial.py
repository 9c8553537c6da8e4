"""The Triton engine's spatial small steps (``triton_ops.spatial``) against a float64 oracle on the same
values: ``F.conv3d`` for the logits, autograd through conv3d, ``F.batch_norm`` and the gate for the
backward; on the CPU through the Triton interpreter where no GPU is present.

Tolerances: float64 1e-10, float32 1e-5, relative and of the reference's largest magnitude absolute.
Every call runs with ``torch.empty``/``torch.empty_like`` returning NaN-filled tensors, so an element a
kernel fails to write shows.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels
pytest.importorskip("triton")

from poison import poisoned  # noqa: E402

from cbam.ops.engines.triton_ops import spatial  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# (B, I, the conv weight's kernel, spatial dims): padded to three dims as fused.py does; sizes smaller
# than the kernel, S = 1, S no power of two, and (45 x 50) more positions than one interpreter tile
CASES = [
    (3, 2, (7, 7), (5, 6)),
    (1, 1, (3, 3), (2, 3)),
    (3, 2, (3, 3, 3), (3, 4, 5)),
    (3, 1, (5,), (7,)),
    (2, 2, (7, 7), (1, 1)),
    (2, 1, (3, 3), (45, 50)),
]
# (norm: None, "running" or "batch"; with a weight; hard-sigmoid)
NORMS = [(None, False, False), (None, False, True), ("running", False, True), ("running", True, False),
         ("batch", False, False), ("batch", True, True)]
DTYPES = [torch.float32, F64]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def padded(dims) -> list[int]:
    return [1] * (3 - len(dims)) + list(dims)


def check(out, ref):
    """``out`` (contiguous) equals the float64 ``ref`` within the rounding of ``out``'s dtype."""
    assert out.shape == ref.shape and out.is_contiguous()
    tol = 1e-10 if out.dtype == F64 else 1e-5
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.to(F64), ref, rtol=tol, atol=tol * scale)


def inputs(batch, maps, kernel, dims):
    """float64 ``mean, speak (B, S)`` and ``conv_w (1, I, *kernel)``."""
    positions = math.prod(dims)
    mean, speak = torch.randn(2, batch, positions, dtype=F64, device=DEVICE)
    return mean, speak, torch.randn(1, maps, *kernel, dtype=F64, device=DEVICE) / math.prod(kernel) ** 0.5


def oracle_logits(mean, speak, conv_w, dims):
    size, kernel = padded(dims), padded(conv_w.shape[2:])
    batch, maps = mean.shape[0], conv_w.shape[1]
    stacked = torch.stack([mean, speak], 1) if maps == 2 else ((mean + speak) / 2).unsqueeze(1)
    out = F.conv3d(stacked.view(batch, maps, *size), conv_w.view(1, maps, *kernel), padding=[k // 2 for k in kernel])
    return out.view(batch, -1)


@pytest.mark.parametrize("batch,maps,kernel,dims", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spatial_logits(batch, maps, kernel, dims, dtype):
    mean, speak, conv_w = inputs(batch, maps, kernel, dims)
    with poisoned():
        out, ms = spatial.spatial_logits(mean.to(dtype), speak.to(dtype), conv_w.to(dtype), padded(dims),
                                         padded(kernel))
    assert out.dtype == dtype and ms is None
    check(out, oracle_logits(mean, speak, conv_w, dims))


@pytest.mark.parametrize("batch,maps,kernel,dims", CASES[:4])
@pytest.mark.parametrize(("norm", "weight", "bias", "hard"), [
    (False, False, False, False), (False, False, False, True), (True, False, False, False), (True, True, True, True),
    (True, True, False, False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spatial_logits_finish_the_gate_through_a_fixed_norm(batch, maps, kernel, dims, norm, weight, bias, hard,
                                                             dtype):
    mean, speak, conv_w = inputs(batch, maps, kernel, dims)
    running_mean, running_var = torch.randn(1, dtype=F64) / 4, 0.5 + torch.rand(1, dtype=F64)
    norm_w, norm_b = 0.5 + torch.rand(1, dtype=F64), torch.randn(1, dtype=F64)
    logits = oracle_logits(mean, speak, conv_w, dims)
    z = logits
    if norm:
        z = F.batch_norm(logits.unsqueeze(1), running_mean, running_var, norm_w if weight else None,
                         norm_b if bias else None, training=False, eps=EPS).squeeze(1)
    want = F.relu6(z + 3) / 6 if hard else torch.sigmoid(z)
    low = [None if t is None else t.to(dtype) for t in (mean, speak, conv_w)]
    given = {"norm_w": norm_w if norm and weight else None, "norm_b": norm_b if norm and bias else None,
             "running_mean": running_mean if norm else None, "running_var": running_var if norm else None}
    with poisoned():
        found, ms = spatial.spatial_logits(*low, padded(dims), padded(kernel), finish=True, hard=hard, eps=EPS,
                                           **{name: None if t is None else t.to(dtype) for name, t in given.items()})
    check(found, logits)
    check(ms, want)


def oracle_backward(mean, speak, conv_w, dims, d_ms, norm, hard, weight, running_mean, running_var):
    """The logits and the gate ``ms`` (float64), and by autograd the gradients for mean, speak, conv_w
    and the norm's weight (1 where it has none) and bias (``None`` without a norm)."""
    leaves = [t.clone().requires_grad_() for t in (mean, speak, conv_w)]
    affine = [(torch.ones(1, dtype=F64) if weight is None else weight.clone()).requires_grad_(),
              torch.zeros(1, dtype=F64, requires_grad=True)]
    logits = oracle_logits(*leaves, dims)
    z = logits
    if norm is not None:
        stats = (None, None) if norm == "batch" else (running_mean, running_var)
        z = F.batch_norm(logits.unsqueeze(1), *stats, *affine, training=norm == "batch", eps=EPS).squeeze(1)
    ms = F.relu6(z + 3) / 6 if hard else torch.sigmoid(z)
    grads = torch.autograd.grad(ms, [*leaves, *affine], d_ms, allow_unused=True)
    return logits.detach(), ms.detach(), grads


@pytest.mark.parametrize("batch,maps,kernel,dims", CASES)
@pytest.mark.parametrize("norm,affine,hard", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spatial_backward(batch, maps, kernel, dims, norm, affine, hard, dtype):
    mean, speak, conv_w = inputs(batch, maps, kernel, dims)
    d_ms = torch.randn_like(mean)
    weight = 0.5 + torch.rand(1, dtype=F64) if affine else None
    running_mean, running_var = torch.randn(1, dtype=F64) / 4, 0.5 + torch.rand(1, dtype=F64)
    logits, ms, grads = oracle_backward(mean, speak, conv_w, dims, d_ms, norm, hard, weight, running_mean,
                                        running_var)
    low = [None if t is None else t.to(dtype) for t in (logits, ms, d_ms, mean, speak, conv_w, weight, running_mean,
                                                        running_var)]
    with poisoned():
        found = spatial.spatial_backward(*low[:6], padded(dims), padded(kernel), hard, norm is not None,
                                         norm == "batch", *low[6:], EPS)
    expected = list(grads[:3])
    if maps == 1:  # the average's gradient, each statistic's half
        expected[:2] = [expected[0]] * 2
    expected += grads[3:] if norm is not None else [torch.zeros(1, dtype=F64)] * 2
    assert len(found) == 5 and all(out.dtype == dtype for out in found)
    for out, ref in zip(found, expected):
        check(out, ref)


@pytest.mark.parametrize("norm", [None, "batch"])
def test_empty_batch(norm):
    mean, speak, conv_w = inputs(0, 2, (7, 7), (5, 6))
    size, kernel = padded((5, 6)), padded((7, 7))
    with poisoned():
        logits, _ = spatial.spatial_logits(mean, speak, conv_w, size, kernel)
        found = spatial.spatial_backward(logits, logits, logits, mean, speak, conv_w, size, kernel, False,
                                         norm is not None, True, None, None, None, EPS)
    assert logits.shape == (0, 30)
    for out, ref in zip(found, [mean, speak, torch.zeros_like(conv_w), torch.zeros(1, dtype=F64),
                                torch.zeros(1, dtype=F64)]):
        assert out.shape == ref.shape and torch.equal(out, ref)


# (B, S): one program's tile and more (the interpreter's block is 4 tiles: 8192 logits), odd sizes, two logits
NORM_SHAPES = [(3, 30), (2, 1), (1, 2), (4, 2500)]


@pytest.mark.parametrize("batch,positions", NORM_SHAPES)
@pytest.mark.parametrize(("weight", "bias", "running", "hard"), [
    (False, False, False, False), (True, True, True, False), (True, False, True, True), (False, True, False, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spatial_norm_gate_on_batch_statistics(batch, positions, weight, bias, running, hard, dtype):
    # logits far from zero: their variance must not cancel in the sums
    logits = 40 + 3 * torch.randn(batch, positions, dtype=F64, device=DEVICE)
    norm_w, norm_b = 0.5 + torch.rand(1, dtype=F64), torch.randn(1, dtype=F64)
    running_mean, running_var = torch.randn(1, dtype=F64), 0.5 + torch.rand(1, dtype=F64)
    want_mean, want_var = running_mean.clone(), running_var.clone()
    z = F.batch_norm(logits.unsqueeze(1), want_mean if running else None, want_var if running else None,
                     norm_w if weight else None, norm_b if bias else None, training=True, momentum=0.3,
                     eps=EPS).squeeze(1)
    want = F.relu6(z + 3) / 6 if hard else torch.sigmoid(z)
    found_mean, found_var = running_mean.to(dtype), running_var.to(dtype)
    with poisoned():
        ms = spatial.spatial_norm_gate(logits.to(dtype), norm_w.to(dtype) if weight else None,
                                       norm_b.to(dtype) if bias else None, found_mean if running else None,
                                       found_var if running else None, EPS, 0.3, hard)
    check(ms, want)
    if running:  # moved in place as torch's BatchNorm moves them
        check(found_mean, want_mean)
        check(found_var, want_var)


def test_spatial_norm_gate_keeps_a_bfloat16_norm_in_its_dtype():
    """A bfloat16 module's BatchNorm on float32 logits: the gate in float32, the running statistics updated
    in float32 and stored in bfloat16."""
    logits = torch.randn(2, 40, device=DEVICE)
    running_mean, running_var = torch.zeros(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16)
    weight = torch.full((1,), 1.5, dtype=torch.bfloat16)
    ms = spatial.spatial_norm_gate(logits, weight, None, running_mean, running_var, EPS, 0.1, False)
    variance, mean = torch.var_mean(logits.double(), correction=0)
    want = torch.sigmoid((logits.double() - mean) / torch.sqrt(variance + EPS) * 1.5)
    assert ms.dtype == torch.float32
    check(ms, want)
    assert running_mean.dtype == running_var.dtype == torch.bfloat16
    within_bfloat16 = {"rtol": 2**-7, "atol": 1e-6}  # one step: Triton's interpreter truncates to bfloat16
    torch.testing.assert_close(running_mean.double(), (0.1 * mean).view(1), **within_bfloat16)
    torch.testing.assert_close(running_var.double(), (0.9 + 0.1 * variance * 80 / 79).view(1), **within_bfloat16)
