"""The engine seam: which engine an input runs on, the CBAM_ENGINE override, when impl="auto" fuses,
and the fused path under autocast (gates in float32, output in the input's dtype) against float64."""

import os

import pytest
import torch

import cbam
from cbam import functional, ops
from cbam.ops import engine_for, engines, fused_applies
from cbam.ops.engines import cpp

CPP = "cpp" if cpp.engine() is not None else "torch"  # what auto picks for contiguous float CPU input


def test_auto_picks_the_compiled_engine_where_it_covers_the_input():
    x = torch.randn(2, 8, 5, 5)
    assert engine_for(x) == CPP
    assert engine_for(x.double()) == CPP
    assert engine_for(x.bfloat16()) == CPP and engine_for(x.half()) == CPP  # bf16 as stored, fp16 on a float32 copy
    assert engine_for(x.bfloat16(), widened=False) == CPP  # the C++ passes read bfloat16 as stored
    assert engine_for(x.half(), widened=False) == "torch"  # and float16 on a float32 copy only
    assert engines.widened_dtype(x.bfloat16()) == (torch.float32 if CPP == "cpp" else None)
    assert engines.widened_dtype(x) is None and engines.widened_dtype(x.double()) is None
    assert engines.select(x.half())[0].name == "torch"  # select never widens
    assert engines.select(x.bfloat16())[0].name == CPP
    assert engine_for(x.to(memory_format=torch.channels_last)) == CPP  # contiguous or channels-last
    assert engine_for(x.transpose(1, 2).contiguous().transpose(1, 2)) == "torch"  # not channels-last either
    assert engine_for(x[:, :, ::2]) == "torch"


def test_cbam_engine_names_an_engine_and_falls_back_where_it_cannot_run(monkeypatch):
    x = torch.randn(2, 8, 5, 5)
    monkeypatch.setenv("CBAM_ENGINE", "torch")
    assert engine_for(x) == "torch"
    monkeypatch.setenv("CBAM_ENGINE", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert engine_for(x) == "torch"  # triton runs on CUDA, or on the CPU only in its interpreter
    monkeypatch.setenv("CBAM_ENGINE", " CPP ")
    assert engine_for(x) == CPP


def test_cbam_engine_rejects_an_unknown_name(monkeypatch):
    monkeypatch.setenv("CBAM_ENGINE", "cuda")
    with pytest.raises(ValueError, match="CBAM_ENGINE must be one of auto, torch, cpp, triton, got 'cuda'"):
        engine_for(torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="engine must be one of auto, torch, cpp, triton, got 'gpu'"):
        with engines.using("gpu"):
            pass


def test_using_sets_and_restores_the_variable(monkeypatch):
    monkeypatch.delenv("CBAM_ENGINE", raising=False)
    with engines.using("torch"):
        assert os.environ["CBAM_ENGINE"] == "torch"
        with engines.using("cpp"):
            assert os.environ["CBAM_ENGINE"] == "cpp"
        assert os.environ["CBAM_ENGINE"] == "torch"
    assert "CBAM_ENGINE" not in os.environ


def test_channels_last_views_are_recognised():
    x = torch.randn(2, 6, 4, 5)
    assert not engines.is_channels_last_view(x)
    assert engines.is_channels_last_view(x.to(memory_format=torch.channels_last))
    assert engines.is_channels_last_view(torch.randn(2, 6, 3, 4, 5).to(memory_format=torch.channels_last_3d))
    assert not engines.is_channels_last_view(x.transpose(2, 3))
    sliced = torch.randn(4, 6, 4, 5).to(memory_format=torch.channels_last)[::2]  # every other sample
    assert not engines.is_channels_last_view(sliced) and engines.is_channels_last_view(sliced[:1])


def test_layouts_are_read_from_fake_tensors_too():
    """What ``torch.compile`` traces with: a fake tensor refuses a view with ``ValueError`` (a real one with
    ``RuntimeError``); either way the layout is not channels-last, and the engine is the torch one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 3, 5)
        assert engines.is_channels_last_view(x.to(memory_format=torch.channels_last))
        assert not engines.is_channels_last_view(x.transpose(2, 3))
        with engines.using("auto"):
            assert engines.engine_for(x.transpose(2, 3)) == "torch"


def test_auto_fuses_where_a_compiled_engine_runs():
    x = torch.randn(1, 4, 3, 3)
    assert fused_applies("auto", "channel-spatial", x) == (CPP == "cpp")
    assert not fused_applies("auto", "spatial-channel", x)
    assert fused_applies("auto", "channel-spatial", x.half()) == (CPP == "cpp")  # the C++ engine, widened
    assert not fused_applies("auto", "channel-spatial", x.half()[..., ::2])  # the torch passes: the reference is
    # as fast there
    assert not fused_applies("reference", "channel-spatial", x)
    assert fused_applies("fused", "channel-spatial", x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_applies("auto", "channel-spatial", x) == (CPP == "cpp")
    with engines.using("torch"):
        assert fused_applies("auto", "channel-spatial", x.half())


def test_under_compile_auto_fuses_on_cuda_and_in_cpu_training(monkeypatch):
    """Under ``torch.compile`` ``auto`` keeps the op on CUDA, and on the CPU where a gradient of ``x`` is recorded
    (inductor's own code for the reference measured faster in CPU inference), where a compiled engine covers
    ``x`` as it is (bfloat16 too: the C++ engine reads it as stored), as in eager code: float16 on the CPU, which
    it computes only on a float32 copy, compiles the reference. ``impl="fused"`` keeps the op anywhere."""
    assert ops.COMPILED_OP_DEVICES == {"cuda"} and ops.COMPILED_TRAINING_OP_DEVICES == {"cpu"}
    x = torch.randn(1, 4, 3, 3)
    trained = x.clone().requires_grad_()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fused_applies("auto", "channel-spatial", trained) == (CPP == "cpp")
    assert fused_applies("auto", "channel-spatial", trained.to(memory_format=torch.channels_last)) == (CPP == "cpp")
    assert not fused_applies("auto", "channel-spatial", x)
    with torch.no_grad():
        assert not fused_applies("auto", "channel-spatial", trained)
    assert fused_applies("auto", "channel-spatial", trained.bfloat16()) == (CPP == "cpp")  # read as stored
    assert not fused_applies("auto", "channel-spatial", trained.half())  # widened: the op would not be
    assert fused_applies("fused", "channel-spatial", x.half())
    with engines.using("torch"):
        assert fused_applies("auto", "channel-spatial", trained.half())
    monkeypatch.setattr(ops, "COMPILED_OP_DEVICES", frozenset({"cpu"}))  # as on CUDA
    assert fused_applies("auto", "channel-spatial", x) == (CPP == "cpp")


def reference_pair(channels, **options):
    torch.manual_seed(0)
    fused = cbam.CBAM(channels, 4, 3, impl="fused", **options)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0, 0.5)
    oracle = cbam.CBAM(channels, 4, 3, impl="reference", dtype=torch.float64, **options)
    oracle.load_state_dict(fused.state_dict())
    return fused.eval(), oracle.eval()


@pytest.mark.parametrize("engine", ["torch", "cpp"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_under_autocast_keeps_float32_input_in_float32(engine, memory_format):
    """Under CPU bfloat16 autocast the reference runs its convs and MLP in bfloat16; the fused path computes
    every gate in float32 and returns float32 for float32 input, in its layout: float32-close to the float64
    reference (channels-last with bfloat16 autocast: the usual CPU inference set-up)."""
    fused, oracle = reference_pair(16, preset="timm")
    x = torch.randn(2, 16, 7, 9).contiguous(memory_format=memory_format)
    with engines.using(engine), torch.autocast("cpu", dtype=torch.bfloat16):
        assert engine_for(x) == (engine if engine == "torch" else CPP)
        got = fused(x)
        eager = cbam.CBAM(16, 4, 3, impl="reference", preset="timm").eval()
        eager.load_state_dict(fused.state_dict())
        eager_out = eager(x)
    want = oracle(x.double())
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (eager_out.double() - want).abs().max() > (got.double() - want).abs().max()


def test_fused_bfloat16_input_computes_gates_in_float32():
    """bfloat16 input (torch passes, forced) under autocast: bfloat16 out, within bfloat16's rounding of the
    float64 result (one rounding of the output: 2**-8 relative), input gradient likewise."""
    fused, oracle = reference_pair(16, preset="timm")
    x = torch.randn(2, 16, 7, 9).bfloat16()
    leaf = x.clone().requires_grad_()
    with engines.using("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(leaf)
        got.backward(torch.ones_like(got))
    want_leaf = x.double().requires_grad_()
    want = oracle(want_leaf)
    want.backward(torch.ones_like(want))
    assert got.dtype == torch.bfloat16 and leaf.grad.dtype == torch.bfloat16
    assert fused.channel_att.fc1.weight.grad.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), want_leaf.grad, rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(fused.channel_att.fc1.weight.grad.double(), oracle.channel_att.fc1.weight.grad,
                               rtol=2e-2, atol=2e-2)


def test_reference_output_keeps_the_input_dtype_when_the_gate_is_wider(monkeypatch):
    """CUDA autocast runs ``sum`` in float32, so the channel MLP's result and gate are float32 for bfloat16
    input; emulated here by a channel MLP that returns float32. The output must stay bfloat16 (timm's
    does), not be promoted along with every activation after it."""
    real = functional.channel_mlp
    monkeypatch.setattr(functional, "channel_mlp", lambda *args, **kwargs: real(*args, **kwargs).float())
    module = cbam.CBAM(16, preset="timm", impl="reference").bfloat16()
    x = torch.randn(2, 16, 5, 5).bfloat16()
    assert module.channel_att.attention(x).dtype == torch.float32
    assert module(x).dtype == torch.bfloat16
    assert functional.channel_attention(x, *[p for p in module.channel_att.parameters()][:1],
                                        module.channel_att.fc2.weight).dtype == torch.bfloat16
