"""``torch.compile(fullgraph=True)`` keeps the fused CBAM as the ``cbam::fused_forward`` / ``fused_backward``
custom ops (no graph break), and the compiled network equals the eager one: outputs, every gradient,
every running statistic. ``impl="auto"`` keeps the ops where a compiled engine covers the input, as in eager code;
most tests take ``impl="fused"``, which keeps them anywhere."""

import pytest
import torch
from torch import nn

import cbam
from cbam.ops import engines, library

F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models: dynamo's per-code caches would otherwise pile up past its recompile
    limit (every model instance is a guard of ``ResNet.forward``)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def twins(factory):
    torch.manual_seed(0)
    first = factory()
    second = factory()
    second.load_state_dict(first.state_dict())
    return first, second


def step(model, x):
    """Output and parameter gradients of one training step's loss."""
    out = model(x)
    out.square().sum().backward()
    return out


def assert_same_step(compiled, eager, got, want, output=(0, 0), grads=(0, 0), buffers=(0, 0)):
    """The two models' step results (``got``, ``want``), parameter gradients and buffers equal, each within its
    ``(rtol, atol)``."""
    torch.testing.assert_close(got, want, rtol=output[0], atol=output[1])
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=grads[0], atol=grads[1])
    for p, q in zip(compiled.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(p, q, rtol=buffers[0], atol=buffers[1])


def recording_backend(found: set):
    """A backend that notes the ops in the graph dynamo hands it and runs that graph as it is."""
    def backend(graph_module, inputs):
        found.update(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward
    return backend


def test_compiled_resnet18_keeps_the_fused_ops_and_equals_eager():
    compiled, eager = twins(lambda: cbam.models.resnet18(num_classes=10, stem="cifar", impl="fused"))
    found: set[str] = set()
    x = torch.randn(2, 3, 32, 32)
    got = step(torch.compile(compiled, fullgraph=True, backend=recording_backend(found)), x)
    want = step(eager, x)
    assert any(target.startswith("cbam.fused_forward") for target in found)
    assert_same_step(compiled, eager, got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_under_compile_on_the_cpu_keeps_the_op_in_training(dtype):
    """``impl="auto"`` under compile on the CPU: a training step runs the op for float32 and bfloat16 (the C++
    engine reads both as they are) and the reference's standard ops for float16 (the C++ engine computes it only
    on a float32 copy, which the op does not take); inference runs the reference (inductor's code for it
    measured faster there). All equal eager code on the same path (for float16, eager ``auto`` takes the widened
    fused path)."""
    def eager_reference():
        for module in eager.modules():
            if isinstance(module, cbam.CBAM):
                module.impl = "reference"

    compiled, eager = twins(lambda: cbam.models.resnet18(num_classes=10, stem="cifar").to(dtype))
    if dtype == torch.float16:
        eager_reference()
    found: set[str] = set()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    model = torch.compile(compiled, fullgraph=True, backend=recording_backend(found))
    got = step(model, x)
    want = step(eager, x)
    assert any(target.startswith("cbam.fused_forward") for target in found) == (dtype != torch.float16)
    assert any("sigmoid" in target for target in found) == (dtype == torch.float16)
    assert_same_step(compiled, eager, got, want)
    found.clear()
    if dtype == torch.bfloat16:  # compiled inference runs the reference; eager too then, for the same roundings
        eager_reference()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-5)  # eager: the fused path, rounded apart
    assert not any(target.startswith("cbam.") for target in found)


@pytest.mark.parametrize("training", [False, True])
def test_compiled_inference_takes_the_op_that_saves_nothing_and_equals_eager(training):
    """Under ``no_grad`` the graph calls ``cbam::fused_inference`` (no arg-maxima, nothing saved), never
    ``fused_forward``; a network in training mode updates the running statistics as eager code does."""
    compiled, eager = twins(lambda: cbam.models.resnet18(num_classes=10, stem="cifar", impl="fused").train(training))
    found: set[str] = set()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = torch.compile(compiled, fullgraph=True, backend=recording_backend(found))(x)
        want = eager(x)
    assert any(target.startswith("cbam.fused_inference") for target in found)
    assert not any(target.startswith("cbam.fused_forward") for target in found)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for p, q in zip(compiled.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_aot_compiled_resnet18_forward_backward_equals_eager(training):
    """Through AOTAutograd (functionalisation, the fake implementations, the registered backward)."""
    compiled, eager = twins(lambda: cbam.models.resnet18(num_classes=10, stem="cifar", impl="fused").train(training))
    x = torch.randn(2, 3, 32, 32)
    got = step(torch.compile(compiled, fullgraph=True, backend="aot_eager"), x)
    want = step(eager, x)
    assert_same_step(compiled, eager, got, want, output=(1e-6, 1e-6), grads=(1e-5, 1e-6), buffers=(1e-6, 1e-6))


def test_the_op_matches_the_float64_reference_with_a_folded_norm_and_a_residual():
    torch.manual_seed(1)
    fused = cbam.CBAM(8, 2, 3, preset="timm", impl="fused", dtype=F64)
    reference = cbam.CBAM(8, 2, 3, preset="timm", impl="reference", dtype=F64)
    reference.load_state_dict(fused.state_dict())
    norms = [nn.BatchNorm2d(8, dtype=F64) for _ in range(2)]
    x, residual = torch.randn(2, 8, 5, 6, dtype=F64), torch.randn(2, 8, 5, 6, dtype=F64)
    leaves = [[t.clone().requires_grad_() for t in (x, residual)] for _ in range(2)]
    got = library.fused_cbam_op(*leaves[0], *fused._fused_inputs(), norms[0])
    want = torch.relu(reference(norms[1](leaves[1][0])) + leaves[1][1])
    torch.testing.assert_close(got, want)
    runs = ((got, leaves[0], fused, norms[0]), (want, leaves[1], reference, norms[1]))
    grads = [torch.autograd.grad(out.sum(), [*inputs, *module.parameters(), *norm.parameters()])
             for out, inputs, module, norm in runs]
    for found, expected in zip(*grads, strict=True):
        torch.testing.assert_close(found, expected)
    torch.testing.assert_close(norms[0].running_var, norms[1].running_var)
    assert norms[0].num_batches_tracked == norms[1].num_batches_tracked == 1


@pytest.mark.parametrize(("dtype", "training"), [(F64, False), (torch.bfloat16, True)])
def test_opcheck_passes(dtype, training):
    """torch's own checks of the op: schema, fake tensors (dtypes, shapes and strides of every result,
    the empty placeholders included), autograd registration, AOT dispatch."""
    module = cbam.CBAM(8, 2, 3, preset="timm", dtype=F64 if dtype == F64 else torch.float32).train(training)
    spec, weights = module._fused_inputs()
    x = torch.randn(2, 8, 4, 5, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    empty = x.new_empty(0)
    norm = [spec.norm.weight, spec.norm.bias, spec.norm.running_mean, spec.norm.running_var, empty]
    mode = library.BATCH if training else library.RUNNING
    args = (x, None, [empty if w is None else w for w in weights.flat()], norm, [empty] * 5, "avg,max", "sigmoid",
            "concat", mode, 0.1, 1e-5, library.NONE, 0.0, 0.0, library.SOURCE)
    torch.library.opcheck(torch.ops.cbam.fused_forward.default, args)


def test_what_the_ops_cover():
    assert library.covers(*cbam.CBAM(8, preset="timm")._fused_inputs())
    assert not library.covers(*cbam.CBAM(8, pool_types=("avg", "lp"))._fused_inputs())
    assert not library.covers(*cbam.CBAM(8, spatial_conv="factorized")._fused_inputs())
    module = cbam.CBAM(8, preset="timm")
    module.spatial_att.bn = nn.SyncBatchNorm(1)
    assert not library.covers(*module._fused_inputs())


@pytest.mark.parametrize(("dtype", "training"), [(F64, False), (torch.bfloat16, True)])
def test_opcheck_passes_for_the_inference_op(dtype, training):
    """The same checks of ``cbam::fused_inference``, with a folded BatchNorm and a residual: its fake results'
    dtypes, shapes and strides (the running statistics where a norm on batch statistics updates them)."""
    module = cbam.CBAM(8, 2, 3, preset="timm", dtype=F64 if dtype == F64 else torch.float32).train(training)
    spec, weights = module._fused_inputs()
    x = torch.randn(2, 8, 4, 5, dtype=dtype).to(memory_format=torch.channels_last)
    empty = x.new_empty(0)
    norm = [spec.norm.weight, spec.norm.bias, spec.norm.running_mean, spec.norm.running_var, empty]
    folded = nn.BatchNorm2d(8, dtype=norm[0].dtype).train(training)
    input_norm = [folded.weight, folded.bias, folded.running_mean, folded.running_var, empty]
    mode = library.BATCH if training else library.RUNNING
    plain = [[empty if t is None else t.detach() for t in tensors]  # it records no gradient: no input asks for one
             for tensors in (weights.flat(), norm, input_norm)]
    args = (x, torch.randn_like(x), *plain, "avg,max", "sigmoid", "concat", mode, 0.1, 1e-5, mode, 0.1, 1e-5,
            library.SOURCE)
    torch.library.opcheck(torch.ops.cbam.fused_inference.default, args)


@pytest.mark.parametrize(("layout", "training", "engine"), [
    ("contiguous", True, "auto"), ("channels-last", True, "auto"), ("contiguous", False, "auto"),
    ("contiguous", True, "torch"),  # torch's BatchNorm backward gave a contiguous dx for inductor's channels-last x
])
def test_inductor_compiled_layer_trains_as_eager(layout, training, engine):
    """Two CBAM blocks compiled by inductor itself (not a recording or ``aot_eager`` backend), a training step:
    inductor lays tensors out as it likes (convolutions channels-last on the CPU) and asserts that every result
    of the op has the strides its fake kernel said. The fake said the spatial conv weight's gradient had the
    weight's layout, which inductor had made channels-last; the real one is contiguous, and the backward
    failed. Caches off: a graph compiled by an earlier version must not stand in for this one's. In eval mode
    (fine-tuning with frozen BatchNorms) the folded norms apply their running statistics."""
    def layer():
        return cbam.models.resnet18(num_classes=10, stem="cifar", impl="fused").layer1.train(training)

    compiled, eager = twins(layer)
    x = torch.randn(2, 64, 8, 8)
    if layout == "channels-last":
        compiled, eager, x = (t.to(memory_format=torch.channels_last) for t in (compiled, eager, x))
    with torch._inductor.config.patch(force_disable_caches=True), engines.using(engine):
        got = step(torch.compile(compiled, fullgraph=True), x)
        want = step(eager, x)
    assert_same_step(compiled, eager, got, want, output=(1e-5, 1e-5), grads=(1e-4, 1e-4), buffers=(1e-5, 1e-6))


def test_inductor_compiled_layer_trains_under_cpu_bfloat16_autocast_as_eager():
    """``auto`` under compile keeps the op for bfloat16 CPU training (the C++ engine reads it as stored): two CBAM
    blocks compiled by inductor under CPU bfloat16 autocast, a training step, against the same step in eager code
    (the same op's passes; inductor computes the convolutions and norms around it with its own roundings)."""
    compiled, eager = twins(lambda: cbam.models.resnet18(num_classes=10, stem="cifar").layer1.train())
    x = torch.randn(2, 64, 8, 8).bfloat16()  # as the stem hands it on under autocast (the residual's dtype)
    with torch._inductor.config.patch(force_disable_caches=True), torch.autocast("cpu", dtype=torch.bfloat16):
        got = step(torch.compile(compiled, fullgraph=True), x)
        want = step(eager, x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2**-6)
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=2**-5, atol=2**-5 * scale)


def test_a_graph_compiled_around_other_versions_of_the_ops_is_not_reused(tmp_path, monkeypatch):
    """Inductor's on-disk cache of compiled graphs hashes the graph, not the ops' fake kernels or tags: the digest
    of the ops' source, an argument of every call, keeps a graph compiled around another version of them from
    being reused; and the op refuses a call that carries another digest."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    module = cbam.CBAM(8, 2, 3, preset="timm", impl="fused").eval()
    x = torch.randn(2, 8, 5, 6)

    def compiled_hits() -> int:
        torch._dynamo.reset()
        counters.clear()
        with torch._inductor.config.patch(fx_graph_cache=True), torch.no_grad():
            torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-5, atol=1e-6)
        return counters["inductor"]["fxgraph_cache_hit"]

    assert compiled_hits() == 0
    assert compiled_hits() == 1
    installed = library.SOURCE
    monkeypatch.setattr(library, "SOURCE", "another-version")
    assert compiled_hits() == 0
    monkeypatch.setattr(library, "SOURCE", installed)
    with pytest.raises(RuntimeError, match="another version of cbam's ops"), torch.no_grad():
        library.fused_inference(x, None, *[[] for _ in range(3)], "avg,max", "sigmoid", "concat", 0, 0.0, 0.0, 0, 0.0,
                                0.0, "another-version")
