"""The one-time calibration behind ``impl="auto"`` (``cbam.ops.calibration``): the faster path per key
(shape, dtype, inference or training, residual, folded BatchNorm), the per-process cache, the off
switch, no side effects, and the same outputs whichever path is chosen. The clock is a stub that
makes one path faster: nothing here asserts on real time."""

import pytest
import torch
from torch import nn

import cbam
import cbam.nn.cbam as cbam_module
from cbam.models import resnet18
from cbam.ops import calibration
from cbam.ops.engines import cpp

HAS_CPP = cpp.engine() is not None
PATHS = ("fused", "reference")


class StubTimer:
    """Runs each path as the real timer does and reports ``faster`` as 1 s, the other as 2 s."""

    def __init__(self, faster: str) -> None:
        self.faster = faster
        self.calls = {path: 0 for path in PATHS}

    def __call__(self, path: str, run) -> float:
        self.calls[path] += 1
        run()
        return 1.0 if path == self.faster else 2.0

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def calibrated(monkeypatch):
    """Calibration on (the suite runs with ``CBAM_CALIBRATE=0``), an empty cache, and a way to install a
    stub timer. Without the C++ engine, the torch engine stands in for it (``CBAM_ENGINE=torch``)."""
    monkeypatch.setenv(calibration.ENV, "1")
    if not HAS_CPP:
        monkeypatch.setenv("CBAM_ENGINE", "torch")
        monkeypatch.setattr(calibration, "engine_for", lambda x: "cpp")
    calibration.clear()

    def install(faster: str) -> StubTimer:
        stub = StubTimer(faster)
        monkeypatch.setattr(calibration, "timer", stub)
        return stub

    yield install
    calibration.clear()


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times ``CBAM.forward`` entered the fused function (calibration's runs included)."""
    count = {"n": 0}
    real = cbam_module.checked_fused_cbam

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cbam_module, "checked_fused_cbam", counting)
    return count


def _call(module, x, training: bool, **kwargs):
    if training:
        return module(x.clone().requires_grad_(), **kwargs)
    with torch.no_grad():
        return module(x, **kwargs)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("faster", PATHS)
@pytest.mark.parametrize("shape", [(2, 16, 5, 5), (3, 32, 7, 4)])
def test_auto_takes_the_faster_path_per_mode_and_shape(calibrated, fused_calls, training, faster, shape):
    stub = calibrated(faster)
    module = cbam.CBAM(shape[1], 4, preset="timm").train(training)
    x = torch.randn(shape)
    _call(module, x, training)
    (key, decision), = calibration.decisions().items()
    assert (key.shape, key.dtype, key.training, key.residual, key.fold) == (shape, torch.float32, training, False,
                                                                            False)
    assert decision.path == faster
    assert stub.calls == {"fused": 1 + calibration.REPEATS, "reference": 1 + calibration.REPEATS}
    fused_calls["n"] = 0
    _call(module, x, training)
    assert fused_calls["n"] == (faster == "fused")  # the cached path ran, once, and nothing was re-timed
    assert stub.total == 2 * (1 + calibration.REPEATS)
    assert module.fuses(x.requires_grad_(training)) == (faster == "fused")


def test_each_key_is_timed_once_per_process(calibrated):
    stub = calibrated("fused")
    module = cbam.CBAM(16, 4).eval()
    x = torch.randn(2, 16, 6, 6)
    per_key = 2 * (1 + calibration.REPEATS)
    for _ in range(3):
        _call(module, x, training=False)
    assert stub.total == per_key
    _call(cbam.CBAM(16, 4).eval(), x, training=False)  # another module with the same settings shares the key
    assert stub.total == per_key
    _call(module, x, training=True)  # another mode
    _call(module, torch.randn(2, 16, 6, 7), training=False)  # another shape
    _call(module.double(), x.double(), training=False)  # another dtype
    _call(module, x.double().contiguous(memory_format=torch.channels_last), training=False)  # another layout
    assert stub.total == 5 * per_key and len(calibration.decisions()) == 5
    assert sorted(key.channels_last for key in calibration.decisions()) == [False] * 4 + [True]
    calibration.clear()
    assert calibration.decisions() == {}


def test_deterministic_algorithms_fuse_without_timing(calibrated, fused_calls):
    """Under ``torch.use_deterministic_algorithms(True)`` nothing is timed (a choice by timing may differ from
    run to run): ``auto`` fuses wherever the compiled engine covers ``x``, as with the off switch."""
    stub = calibrated("reference")
    module = cbam.CBAM(16, 4)
    x = torch.randn(2, 16, 5, 5)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert module.fuses(x)
        _call(module, x, training=True)
    finally:
        torch.use_deterministic_algorithms(before)
    assert stub.total == 0 and calibration.decisions() == {} and fused_calls["n"] == 1
    _call(module, x, training=True)  # switched back: timed, and the stub's faster reference is kept
    assert stub.total == 2 * (1 + calibration.REPEATS) and fused_calls["n"] == 1 + 1 + calibration.REPEATS


def test_the_off_switch_fuses_without_timing(calibrated, monkeypatch):
    stub = calibrated("reference")
    monkeypatch.setenv(calibration.ENV, "0")
    module = cbam.CBAM(16, 4)
    x = torch.randn(2, 16, 5, 5)
    assert module.fuses(x)  # fused wherever the compiled engine covers x, as before calibration
    _call(module, x, training=True)
    assert stub.total == 0 and calibration.decisions() == {}
    monkeypatch.setenv(calibration.ENV, "maybe")
    with pytest.raises(ValueError, match="CBAM_CALIBRATE must be 1 or 0"):
        module(x)


def test_not_calibrated_for_other_impls_while_compiling_or_on_empty_batches(calibrated, monkeypatch):
    stub = calibrated("reference")
    x = torch.randn(2, 16, 5, 5)
    assert cbam.CBAM(16, 4, impl="fused").fuses(x)
    assert not cbam.CBAM(16, 4, impl="reference").fuses(x)
    assert cbam.CBAM(16, 4).fuses(x[:0])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not calibration.applies(x)
    assert stub.total == 0


def _state(*modules):
    return [t.detach().clone() for m in modules for t in m.buffers()]


@pytest.mark.parametrize("faster", PATHS)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_calibration_leaves_statistics_and_gradients_alone(calibrated, faster, training):
    calibrated(faster)
    torch.manual_seed(0)
    module = cbam.CBAM(16, 4, preset="official").train(training)  # spatial BatchNorm, MLP bias
    norm = nn.BatchNorm2d(16).train(training)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    module.channel_att.fc1.weight.grad = torch.full_like(module.channel_att.fc1.weight, 3.0)
    x = torch.randn(2, 16, 6, 6, requires_grad=training)
    residual = torch.randn(2, 16, 6, 6, requires_grad=training)
    before = _state(module, norm)
    module.fuses(x, residual, norm)  # calibrates this call's key, runs nothing else
    assert len(calibration.decisions()) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _state(module, norm)))
    assert int(norm.num_batches_tracked) == 0
    assert torch.equal(module.channel_att.fc1.weight.grad, torch.full_like(module.channel_att.fc1.weight, 3.0))
    assert all(p.grad is None for name, p in module.named_parameters() if name != "channel_att.fc1.weight")
    assert all(p.grad is None for p in norm.parameters()) and x.grad is None and residual.grad is None


def _run(module, norm, x, residual, training):
    """Output, input/residual gradients, parameter gradients and the norms' buffers of one call."""
    module.zero_grad(set_to_none=True)
    norm.zero_grad(set_to_none=True)
    if not training:
        with torch.no_grad():
            return [module(x, residual, input_norm=norm), *_state(module, norm)]
    leaves = [x.clone().requires_grad_(), residual.clone().requires_grad_()]
    out = module(*leaves, input_norm=norm)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    params = [p.grad for p in (*module.parameters(), *norm.parameters())]
    return [out, *(t.grad for t in leaves), *params, *_state(module, norm)]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_outputs_agree_whichever_path_is_chosen(calibrated, training):
    torch.manual_seed(1)
    x, residual = torch.randn(2, 16, 7, 7), torch.randn(2, 16, 7, 7)
    reference = cbam.CBAM(16, 4, preset="timm", impl="reference").train(training)
    results = {}
    for faster in PATHS:
        calibration.clear()
        calibrated(faster)
        module = cbam.CBAM(16, 4, preset="timm").train(training)
        module.load_state_dict(reference.state_dict())
        norm = nn.BatchNorm2d(16).train(training)
        results[faster] = _run(module, norm, x, residual, training)
        assert {d.path for d in calibration.decisions().values()} == {faster}
    expected = _run(reference, nn.BatchNorm2d(16).train(training), x, residual, training)
    for got in results.values():
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("faster", PATHS)
def test_resnet_blocks_follow_the_calibrated_choice(calibrated, faster):
    calibrated(faster)
    torch.manual_seed(2)
    model = resnet18(num_classes=10, stem="cifar", preset="timm").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = model(x)
    tails = [key for key in calibration.decisions() if key.residual]
    assert tails and all(key.fold and not key.training for key in tails)
    assert {d.path for d in calibration.decisions().values()} == {faster}
    calibration.clear()
    with calibration_off():
        with torch.no_grad():
            expected = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


class calibration_off:
    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv(calibration.ENV, "0")

    def __exit__(self, *exc):
        self.mp.undo()


def test_describe_names_shape_mode_and_path(calibrated):
    calibrated("reference")
    _call(cbam.CBAM(16, 4).eval(), torch.randn(2, 16, 5, 5), training=False)
    line, = calibration.describe()
    assert line.startswith("2×16×5×5 float32 inference: reference (fused 2000.00 ms, reference 1000.00 ms)")


def test_calibration_runs_are_invisible_to_saved_tensor_hooks(calibrated):
    """``cbam.profile.saved_bytes`` counts what autograd saves inside its hooks: not calibration's runs."""
    calibrated("fused")
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        cbam.CBAM(16, 4).fuses(torch.randn(2, 16, 5, 5, requires_grad=True))
    assert len(calibration.decisions()) == 1 and packed == []


def test_a_decision_taken_under_autocast_is_not_used_outside_it(calibrated):
    """Under CPU autocast the reference computes its MLP and conv in bfloat16 and the fused path in float32:
    their times there say nothing of the two paths without autocast (nor the other way round)."""
    stub = calibrated("reference")
    x = torch.randn(2, 16, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _call(cbam.CBAM(16, 4).eval(), x, training=False)
    assert stub.total == 2 * (1 + calibration.REPEATS)
    _call(cbam.CBAM(16, 4).eval(), x, training=False)  # another module, same settings: the key is shared
    module = cbam.CBAM(16, 4).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _call(module, x, training=False)
    _call(module, x, training=False)  # the same module: its own answers
    assert stub.total == 2 * 2 * (1 + calibration.REPEATS)
    assert sorted(str(key.autocast) for key in calibration.decisions()) == ["None", "torch.bfloat16"]
