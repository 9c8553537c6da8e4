"""Export of a ResNet-CBAM: TorchScript (trace) and ONNX (run in ONNX Runtime) compute as eager PyTorch.

TorchScript is traced: ``torch.jit.script`` cannot compile ``cbam.functional`` (it dispatches pools
and gates through module-level dicts of Python functions, which TorchScript refuses as closed-over
globals), and scripting is deprecated in torch 2.x anyway. Tracing records the tensor ops; the input
checks run at trace time only (hence the ``TracerWarning``s filtered below).

ONNX uses the default ``torch.export``-based exporter (``dynamo=True``, opset 18): the TorchScript-based
one is deprecated and warns that it will be removed. The batch dimension is exported as dynamic.
"""

from __future__ import annotations

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from cbam.models import resnet18

SEED = 0
OPSET = 18


def _model() -> nn.Module:
    """ResNet-18 with official-preset CBAMs (MLP bias, spatial BN), random BN stats and affines, eval mode."""
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = resnet18(num_classes=10, preset="official")
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.1)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def _inputs(*batches: int, size: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED + 1)
    return [torch.randn(batch, 3, size, size, generator=gen) for batch in batches]


def _assert_close(got, expected: torch.Tensor) -> None:
    got = torch.as_tensor(got)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_traced_resnet_cbam_saves_loads_and_computes_as_eager(tmp_path):
    """Traced at batch 2, saved, loaded: equal outputs at batch 2 and 3."""
    model = _model()
    example, other = _inputs(2, 3)
    traced = torch.jit.trace(model, example)
    path = tmp_path / "resnet18_cbam.pt"
    traced.save(str(path))
    loaded = torch.jit.load(str(path))

    with torch.no_grad():
        for x in (example, other):
            _assert_close(loaded(x), model(x))


def test_onnx_runtime_matches_pytorch(tmp_path):
    """Exported at batch 2 with a dynamic batch dim; ONNX Runtime (CPU) equals eager at batch 2 and 3."""
    model = _model()
    example, other = _inputs(2, 3)
    path = tmp_path / "resnet18_cbam.onnx"
    torch.onnx.export(
        model, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=["image"],
        output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert {op.domain: op.version for op in graph.opset_import}[""] >= 17

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    with torch.no_grad():
        for x in (example, other):
            (logits,) = session.run(["logits"], {"image": x.numpy()})
            _assert_close(logits, model(x))

