"""The fused CBAM never makes the host wait for the device: no operator in its forward or backward reads
a tensor's value on the host (``.item()``, ``bool()``, data-dependent shapes) or builds a tensor from
Python data (a host-to-device copy that waits for the GPU's queue to drain), on the engines that run on
a GPU. Checked on the CPU by recording every operator that reaches the dispatcher; on a GPU each of
them would stall the launch queue once per CBAM and call.
"""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels

import cbam  # noqa: E402
from cbam.ops import engines  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WAITING = ("aten._local_scalar_dense", "aten.lift_fresh", "aten.nonzero", "aten.masked_select", "aten.is_nonzero",
           "aten.equal", "aten._unique", "aten.unique", "aten.repeat_interleave")


class Recorder(TorchDispatchMode):
    """Every operator dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def waiting(names):
    return [name for name in names if name.startswith(WAITING)]


ENGINES = ["torch"] + (["triton"] if engines.ENGINES["triton"].load() is not None else [])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("training", [True, False])
def test_a_cbam_resnet_stage_never_waits_for_the_device(engine, training):
    """A ResNet-18 stage: two blocks whose CBAM folds the block's BatchNorm and ends in the residual tail."""
    torch.manual_seed(0)
    model = cbam.models.resnet18(attention="cbam", preset="timm").layer1.to(DEVICE).train(training)
    x = torch.randn(2, 64, 8, 8, device=DEVICE)
    with engines.using(engine), Recorder() as recorder:
        out = model(x)
        out.sum().backward()
    assert "FusedCBAMBackward" in {type(node).__name__ for node in _graph(out)}
    assert waiting(recorder.names) == []


def test_the_recorder_sees_a_host_to_device_copy():
    with Recorder() as recorder:
        torch.ones(3).new_tensor([1.0, 2.0]).sum().item()
    assert waiting(recorder.names) == ["aten.lift_fresh.default", "aten._local_scalar_dense.default"]


def _graph(out):
    """Every autograd node behind ``out``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return seen
