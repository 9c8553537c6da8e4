"""Huge finite values and NaN/±inf on the fused path in training and in half precision, on every engine that
covers the dtype, against the reference path and a float64 computation: the gates stay float32 for
bfloat16/float16 input (so a value the float64 computation keeps finite stays finite), and the running
statistics of a BatchNorm on batch statistics (the spatial one, the folded input one) are poisoned by a
non-finite batch as torch's own BatchNorm poisons them."""

import copy

import pytest
import torch
from torch import nn

import cbam
from cbam.ops import engines

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # the interpreter's
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]  # numpy, on purpose here
SHAPE = (2, 8, 4, 5)
HALF = (torch.float16, torch.bfloat16)
WHERE = {"element": (0, 3, 1, 2), "channel": (0, 3)}
VALUES = (float("nan"), float("inf"), float("-inf"))


def covering(dtypes):
    """``(engine, dtype)`` for every engine that loads and covers the dtype, as pytest params."""
    return [pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
            for name in ("torch", "cpp", "triton") for dtype in dtypes
            if dtype in engines.ENGINES[name].dtypes and engines.ENGINES[name].load() is not None]


def modules(dtype, preset="official", input_norm=False):
    """A reference CBAM in training mode with random parameters, its fused twin (on the engine in use when
    called) and, with ``input_norm``, a BatchNorm in training mode for each to fold (float32 for half
    precision input: the fused path folds one in the dtype it computes in)."""
    torch.manual_seed(0)
    reference = cbam.CBAM(8, 2, 3, preset=preset, impl="reference", dtype=dtype).train()
    norm = nn.BatchNorm2d(8, dtype=torch.float32 if dtype in HALF else dtype) if input_norm else None
    with torch.no_grad():
        for p in [*reference.parameters(), *(norm.parameters() if input_norm else ())]:
            p.normal_(0, 0.7)
    fused = copy.deepcopy(reference)
    fused.impl = "fused"
    return (reference, norm), (fused, copy.deepcopy(norm))


def run(pair, x):
    """Output, gradients of ``sum(out)`` (input and parameters) and buffers after one training call."""
    module, norm = pair
    x = x.detach().clone().requires_grad_()
    out = module(x, None, input_norm=norm)
    out.double().sum().backward()
    parts = [("", module)] + ([] if norm is None else [("input.", norm)])
    grads = {"x": x.grad, **{p + n: t.grad for p, m in parts for n, t in m.named_parameters()}}
    buffers = {p + n: t.clone() for p, m in parts for n, t in m.named_buffers()}
    return out.detach(), grads, buffers


def same_buffers(expected, found, what):
    """Equal where finite, and NaN/+inf/-inf at the same places (``num_batches_tracked`` equal)."""
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, equal_nan=True, msg=lambda m, n=name: f"{what}, {n}: {m}")


@pytest.mark.parametrize(("engine", "dtype"), covering((torch.float16,)))
def test_half_precision_spatial_norm_in_training_keeps_float32_logits(engine, dtype):
    """Input up to float16's largest value: the spatial logits exceed it, but the gates compute in float32, so
    output and gradients are finite wherever a float64 computation's are (the reference, whose conv runs in
    float16, overflows here: so float64 is the expectation). The spatial BatchNorm on batch statistics used to
    see the logits cast back to the module's dtype (infinite, NaN after the norm). bfloat16 has float32's
    range: the same cast cost it precision, not range, and at its largest values float32 sums overflow too."""
    big = torch.finfo(dtype).max
    x = (torch.rand(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1) * big
    reference, _ = modules(dtype)
    wide = (copy.deepcopy(reference[0]).double(), None)
    with engines.using(engine):
        fused = modules(dtype)[1]
        out, grads, _ = run(fused, x.to(dtype))
    expected_out, expected_grads, _ = run(wide, x)
    assert expected_out.isfinite().all()
    assert out.isfinite().all(), f"{(~out.isfinite()).sum()} of {out.numel()} outputs not finite"
    for name, grad in expected_grads.items():
        spurious = grad.isfinite() & ~grads[name].isfinite() & (grad.abs() <= big)  # representable in dtype
        assert not spurious.any(), f"d{name}: {spurious.sum()} not finite where float64's are"


@pytest.mark.parametrize(("engine", "dtype"), covering((torch.float32, *HALF)))
@pytest.mark.parametrize("value", VALUES[1:])
@pytest.mark.parametrize("where", WHERE)
def test_folded_norm_running_statistics_of_an_infinite_batch_are_torch_s(engine, dtype, value, where):
    """A channel holding ±inf has the batch mean ±inf (a sum over the batch, as torch's CPU BatchNorm takes it)
    and a NaN variance: the running mean becomes ±inf, not NaN (a Welford mean or one centred on an infinite
    value gave NaN)."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[WHERE[where]] = value
    reference, fused = modules(dtype, preset=None, input_norm=True)
    _, _, expected = run(reference, x)
    with engines.using(engine):
        _, _, found = run(fused, x)
    assert expected["input.running_mean"].isinf().any()
    same_buffers(expected, found, f"{value} at a {where}")


@pytest.mark.parametrize(("engine", "dtype"), covering((torch.float32, *HALF)))
@pytest.mark.parametrize("value", VALUES)
def test_spatial_norm_running_statistics_of_a_non_finite_batch_are_torch_s(engine, dtype, value):
    """A non-finite value in the input makes the spatial logits' batch variance NaN, and torch's BatchNorm
    carries it into the running variance; a maximum with 0 that drops NaN left it finite."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[WHERE["element"]] = value
    reference, fused = modules(dtype)
    _, _, expected = run(reference, x)
    with engines.using(engine):
        _, _, found = run(fused, x)
    assert expected["spatial_att.bn.running_var"].isnan().all()
    same_buffers(expected, found, f"{value} at an element")
