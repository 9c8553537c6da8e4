"""The ``torch.library`` ops and ``BatchNormState`` at their edges: a cumulative-average BatchNorm (``momentum=None``)
under ``torch.compile(fullgraph=True)``, the fake kernels' strides for inputs that are neither contiguous
nor channels-last, and a BatchNorm whose ``track_running_stats`` was switched off after construction;
each against the eager float64 reference."""

import copy

import pytest
import torch
from torch import nn

import cbam
from cbam.ops import library

F64 = torch.float64


def _block(momentum: float | None, track: bool = True) -> tuple[nn.Module, nn.Module]:
    """A timm-preset CBAM (spatial BatchNorm) and a BatchNorm before it, both with ``momentum`` and, where
    ``track`` is false, ``track_running_stats`` switched off after construction (buffers kept)."""
    torch.manual_seed(0)
    module = cbam.CBAM(8, 2, 3, preset="timm", impl="reference", dtype=F64)
    norm = nn.BatchNorm2d(8, momentum=momentum, dtype=F64)
    for bn in (module.spatial_att.bn, norm):
        bn.momentum, bn.track_running_stats = momentum, track
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return module, norm


def _steps(run, module: nn.Module, norm: nn.Module, steps: int = 2) -> list:
    """Outputs and the input's, residual's and every parameter's gradients over ``steps`` training steps."""
    found = []
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        x, residual = (torch.randn(2, 8, 4, 5, dtype=F64, generator=gen).requires_grad_() for _ in range(2))
        out = run(x, residual)
        found += [out, *torch.autograd.grad(out.square().sum(), [x, residual, *module.parameters(),
                                                                   *norm.parameters()])]
    return found


def _assert_same_state(got: list[nn.Module], want: list[nn.Module]) -> None:
    for module, twin in zip(got, want, strict=True):
        for (name, a), b in zip(module.named_buffers(), twin.buffers(), strict=True):
            torch.testing.assert_close(a, b, msg=name)


def test_a_cumulative_average_batch_norm_compiles_in_one_graph_and_equals_eager():
    """``momentum=None`` (factor ``1 / num_batches_tracked``) for the spatial and the folded BatchNorm:
    dynamo cannot pass a factor read from a buffer as a float argument, so the op must read it."""
    module, norm = _block(None)
    fused, fused_norm = copy.deepcopy(module), copy.deepcopy(norm)
    fused.impl = "fused"
    compiled = torch.compile(lambda x, r: fused(x, r, input_norm=fused_norm), fullgraph=True, backend="aot_eager")
    got = _steps(compiled, fused, fused_norm)
    want = _steps(lambda x, r: module(x, r, input_norm=norm), module, norm)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    _assert_same_state([fused, fused_norm], [module, norm])
    assert fused_norm.num_batches_tracked.item() == fused.spatial_att.bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_batch_norms_not_tracking_leave_their_running_statistics_alone(compiled):
    """``track_running_stats=False`` set on a BatchNorm that has buffers: torch normalises with the batch's
    statistics in training and neither updates nor counts; the fused path did update them."""
    module, norm = _block(0.1, track=False)
    fused, fused_norm = copy.deepcopy(module), copy.deepcopy(norm)
    fused.impl = "fused"

    def run(x, residual):
        return fused(x, residual, input_norm=fused_norm)

    got = _steps(torch.compile(run, fullgraph=True, backend="aot_eager") if compiled else run, fused, fused_norm, 1)
    want = _steps(lambda x, r: module(x, r, input_norm=norm), module, norm, 1)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    _assert_same_state([fused, fused_norm], [module, norm])


def _args(x: torch.Tensor, fold: bool = True) -> tuple:
    """``fused_forward``'s arguments for a timm-preset CBAM in training with a residual and (``fold``) a folded
    BatchNorm."""
    torch.manual_seed(0)
    module = cbam.CBAM(8, 2, 3, preset="timm", dtype=x.dtype)
    norm = nn.BatchNorm2d(8, dtype=x.dtype)
    spec, weights = module._fused_inputs()
    empty = x.new_empty(0)

    def tensors(bn):
        return [bn.weight, bn.bias, bn.running_mean, bn.running_var, empty]

    return (x, torch.randn_like(x).requires_grad_(), [empty if w is None else w for w in weights.flat()],
            tensors(spec.norm), tensors(norm) if fold else [empty] * 5, "avg,max", "sigmoid", "concat", library.BATCH,
            0.1, 1e-5, library.BATCH if fold else library.NONE, 0.1, 1e-5, library.SOURCE)


def test_the_fake_kernels_give_an_input_in_another_layout_the_real_strides():
    """An input that is neither contiguous nor channels-last (here transposed) is read as a contiguous copy,
    so the real results are contiguous; the fake ones copied the input's strides, which inductor asserts."""
    x = torch.randn(2, 8, 5, 4, dtype=F64).transpose(2, 3).requires_grad_()
    torch.library.opcheck(torch.ops.cbam.fused_forward.default, _args(x))


def test_the_fake_kernels_take_an_empty_batch():
    """``B = 0`` passes through CBAM (eager and reference); the fake kernel read the spatial size off ``x[0, 0]``,
    so ``torch.compile`` of any covered CBAM failed with an ``IndexError`` on an empty batch (where no BatchNorm
    folds: ``folds_input_norm``)."""
    x = torch.randn(0, 8, 4, 5, dtype=F64).requires_grad_()
    torch.library.opcheck(torch.ops.cbam.fused_forward.default, _args(x, fold=False))


@pytest.mark.parametrize("impl", ["auto", "fused"])
@pytest.mark.parametrize("where", ["cbam", "resnet-block"])
def test_per_sample_gradients_through_torch_func(where, impl):
    """``torch.func.vmap(grad(...))`` (per-sample gradients, as differential-privacy training takes them) of a
    CBAM and of a ResNet block holding one: the fused autograd function cannot enter a ``torch.func`` transform,
    so the reference runs (``impl="fused"`` too); every sample's gradients equal a float64 loop over samples."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    if where == "cbam":
        module = cbam.CBAM(16, 4, preset="timm", impl=impl)
    else:
        module = cbam.models.resnet18(num_classes=3, stem="cifar", preset="timm", impl=impl).layer1[0]
    module = module.double().eval()
    params = {name: p.detach() for name, p in module.named_parameters()}
    x = torch.randn(3, 16 if where == "cbam" else 64, 6, 5, dtype=torch.float64)

    def loss(p, sample):
        return functional_call(module, p, (sample[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        out = module(x[i:i + 1]).square().sum()
        expected = torch.autograd.grad(out, list(module.parameters()))
        for (name, got), want in zip(per_sample.items(), expected):
            torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-12, msg=f"sample {i}, {name}")


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_jit_trace_records_the_reference(impl):
    """``torch.jit.trace`` cannot record the fused autograd function (its parameters would become constants):
    the trace holds the reference's standard ops, ``impl="fused"`` too, and computes as the module at another
    batch size, with gradients."""
    torch.manual_seed(0)
    module = cbam.CBAM(12, 4, 3, preset="timm", impl=impl).double().train()
    traced = torch.jit.trace(module, torch.randn(2, 12, 5, 6, dtype=F64))
    recorded = str(traced.inlined_graph)
    assert "aten::_convolution" in recorded and "aten::sigmoid" in recorded
    assert "PythonOp" not in recorded and "cbam::" not in recorded
    x = torch.randn(3, 12, 5, 6, dtype=F64, requires_grad=True)
    got = traced(x)
    expected = cbam.CBAM(12, 4, 3, preset="timm", impl="reference").double().train()
    expected.load_state_dict(module.state_dict())
    want = expected(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(got.square().sum(), x)
    (wx,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
