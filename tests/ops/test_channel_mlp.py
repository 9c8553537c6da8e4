"""The channel MLP's forward and backward on every engine that has them (``channel_gate``,
``channel_backward``) against torch's linear/relu/gate and autograd in float64, on poisoned allocations."""

import pytest
import torch
from poison import poisoned

from cbam.ops import engines, fused
from cbam.ops.engines import cpp, torch_ops

F64 = torch.float64


def _channel_engines():
    """The engines with the channel MLP's forward and backward: the C++ one where built, the Triton one
    where installed (on the CPU through its interpreter), and torch_ops."""
    found = [pytest.param(torch_ops, id="torch")]
    if cpp.engine() is not None:
        found.append(pytest.param(cpp.engine(), id="cpp"))
    if engines.ENGINES["triton"].load() is not None:
        from cbam.ops.engines import triton_ops
        found.append(pytest.param(triton_ops, id="triton"))
    return found


@pytest.mark.parametrize("engine", _channel_engines())
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("pools", [("avg", "max"), ("max",), ("mix", "avg", "max")])
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize(("batch", "channels", "hidden"), [(3, 37, 5), (17, 50, 20), (2, 300, 64), (0, 8, 2)])
def test_channel_mlp_equals_autograd(engine, hard, pools, biases, batch, channels, hidden):
    """channel_gate and channel_backward against torch's linear/relu/gate and autograd, in float64 (C++:
    loops and BLAS over 2^14 weights; Triton: tiles left over on every axis, an empty batch)."""
    torch.manual_seed(0)
    avg, peak = torch.randn(batch, channels, dtype=F64), torch.randn(batch, channels, dtype=F64)
    fc1_w, fc2_w = torch.randn(hidden, channels, dtype=F64) / channels**0.5, torch.randn(channels, hidden, dtype=F64)
    weights = [fc1_w, torch.randn(hidden, dtype=F64) if biases else None,
               fc2_w / hidden**0.5, torch.randn(channels, dtype=F64) if biases else None]
    leaves = [avg.clone().requires_grad_(), peak.clone().requires_grad_(), *(fused._leaf(w) for w in weights)]
    spec = fused.FusedSpec(pools, "hard-sigmoid" if hard else "sigmoid", "concat", None)
    want = fused._channel_gate({"avg": leaves[0], "max": leaves[1]}, spec, leaves[2:])
    d_mc = torch.randn_like(want)
    want_grads = fused._grads(want, [leaf for leaf in leaves if leaf is not None], d_mc)  # zeros where unused
    coefficients = fused._pool_coefficients(spec)
    with poisoned():
        mc = engine.channel_gate(avg, peak, *coefficients, *weights, hard)
        got = engine.channel_backward(avg, peak, *coefficients, *weights[:3], mc, d_mc, hard)
    torch.testing.assert_close(mc, want.detach())
    d_avg, d_peak, d_w1, d_b1, d_w2, d_b2 = got
    found = [d_avg, d_peak, d_w1, *([d_b1] if biases else []), d_w2, *([d_b2] if biases else [])]
    for g, w in zip(found, want_grads, strict=True):
        torch.testing.assert_close(g, w)
