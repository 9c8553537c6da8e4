"""cbam.debug: shape traces, gradient checks and mixed-precision checks, on modules with known answers."""

import copy
import json

import pytest
import torch
from torch import nn

import cbam
from cbam.debug import NonFinite, check_amp, check_gradients, trace_shapes


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- trace_shapes -------------------------------------------------------------------------------

CBAM_STEPS = [  # CBAM(64) on (2, 64, 8, 8): each intermediate step and its shape, worked out by hand
    ("channel_att:pool[avg]", (2, 64)),
    ("channel_att:pool[max]", (2, 64)),
    ("channel_att:mlp", (2, 64, 1, 1)),
    ("channel_att:gate", (2, 64, 1, 1)),
    ("spatial_att:pool[mean,max]", (2, 2, 8, 8)),
    ("spatial_att:conv", (2, 1, 8, 8)),
    ("spatial_att:gate", (2, 1, 8, 8)),
]


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_trace_of_cbam_shows_its_intermediate_shapes(impl):
    """Whether or not CBAM's forward calls its children (the fused path does not), the steps are there."""
    module = cbam.CBAM(64, impl=impl)
    trace = trace_shapes(module, torch.randn(2, 64, 8, 8))
    assert trace.ok and no_hooks_left(module)
    steps = [(row.path, row.outputs[0]) for row in trace if row.step]
    assert steps == CBAM_STEPS
    root = trace.rows[0]
    assert (root.path, root.type, root.inputs, root.outputs, root.params) == ("", "CBAM", [(2, 64, 8, 8)],
                                                                             [(2, 64, 8, 8)], 64 * 4 * 2 + 2 * 49)
    text = str(trace)
    assert "(2, 64, 1, 1)" in text and "(2, 1, 8, 8)" in text and "(2, 2, 8, 8)" in text


def test_trace_follows_the_order_of_the_gates():
    trace = trace_shapes(cbam.CBAM(16, order="spatial-channel"), torch.randn(1, 16, 4, 4))
    steps = [row.path for row in trace if row.step]
    assert steps[0].startswith("spatial_att:") and steps[-1] == "channel_att:gate"


def test_trace_of_resnet18_has_every_block_at_its_resolution():
    model = cbam.models.resnet18().eval()
    trace = trace_shapes(model, torch.randn(1, 3, 64, 64))
    gates = {row.path: row.outputs[0] for row in trace if row.path.endswith("spatial_att:gate")}
    # stem /4 -> 16x16, then each stage halves: layer1 16, layer2 8, layer3 4, layer4 2
    assert gates == {f"layer{s}.{b}.cbam.spatial_att:gate": (1, 1, side, side)
                     for s, side in zip(range(1, 5), (16, 8, 4, 2)) for b in range(2)}
    calls = {row.path for row in trace if not row.step}
    assert {"conv1", "layer2.0.downsample.0", "fc"} <= calls
    assert trace.rows[-1].path == "fc" and trace.rows[-1].outputs == [(1, 1000)]
    assert no_hooks_left(model)


def test_failing_forward_removes_hooks_and_says_where():
    """The tutorial's dimension mismatch: a 32-channel map into CBAM(64)."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), cbam.CBAM(64))
    trace = trace_shapes(model, torch.randn(2, 3, 8, 8))
    assert not trace.ok and isinstance(trace.error, ValueError)
    assert (trace.failed.path, trace.failed.type, trace.failed.inputs) == ("1", "CBAM", [(2, 32, 8, 8)])
    assert [row.status for row in trace] == ["failed", "ok", "failed"]
    assert "failed in 1 (CBAM): ValueError" in str(trace) and "expects 64 channels" in str(trace)
    assert no_hooks_left(model)


def test_a_caught_exception_is_marked_and_the_trace_goes_on():
    class Fallback(nn.Module):
        def __init__(self):
            super().__init__()
            self.strict = cbam.CBAM(8)
            self.loose = nn.Identity()

        def forward(self, x):
            try:
                return self.strict(x)
            except ValueError:
                return self.loose(x)

    trace = trace_shapes(Fallback(), torch.randn(1, 4, 3, 3))
    assert trace.ok
    assert [(row.path, row.status) for row in trace] == [("", "ok"), ("strict", "raised"), ("loose", "ok")]


def test_trace_leaves_batchnorm_statistics_as_one_forward_does():
    """The steps are recomputed; the spatial BatchNorm must not see that second pass."""
    torch.manual_seed(0)
    traced = cbam.CBAM(16, preset="official", impl="reference").train()
    plain = copy.deepcopy(traced)
    x = torch.randn(2, 16, 5, 5)
    trace_shapes(traced, x)
    with torch.no_grad():
        plain(x)
    for mine, theirs in zip(traced.buffers(), plain.buffers()):
        assert torch.equal(mine, theirs)


def test_trace_describes_nested_inputs_and_exports_json():
    module = cbam.CrossLayerCBAM([8, 16])
    trace = trace_shapes(module, [torch.randn(1, 8, 4, 4), torch.randn(1, 16, 2, 2)])
    assert trace.rows[0].inputs == [[(1, 8, 4, 4), (1, 16, 2, 2)]]
    # the hooks on CBAM's parts send it down the reference path, which calls them (cbam.hooks.parts_watched)
    parts = [f"cbams.{i}{part}" for i in (0, 1) for part in ("", ".channel_att", ".spatial_att")]
    assert [row.path for row in trace if not row.step] == ["", *parts]
    data = json.loads(json.dumps(trace.as_dict()))
    assert data["ok"] and data["rows"][1]["outputs"] == [[1, 8, 4, 4]]
    assert len(list(trace)) == len(trace) == 1 + 2 * (3 + len(CBAM_STEPS))


def test_dynamic_cbam_shows_its_gates():
    trace = trace_shapes(cbam.DynamicCBAM(16), torch.randn(2, 16, 6, 6))
    assert [(row.path, row.outputs[0]) for row in trace if row.step] == [
        (":channel_gate", (2, 16, 1, 1)), (":spatial_gate", (2, 1, 6, 6))]


def test_trace_rejects_a_non_module():
    with pytest.raises(TypeError, match="expects an nn.Module, got builtin_function_or_method"):
        trace_shapes(torch.relu, torch.randn(1))


# --- check_gradients ----------------------------------------------------------------------------

class ScaledSine(torch.autograd.Function):
    """``sin(x) * w`` whose backward is off by 1% for the input, or for the weight."""

    @staticmethod
    def forward(ctx, x, w, wrong_input):
        ctx.save_for_backward(x, w)
        ctx.wrong_input = wrong_input
        return x.sin() * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        dx, dw = grad * x.cos() * w, (grad * x.sin()).sum(0)
        return (dx * 1.01, dw, None) if ctx.wrong_input else (dx, dw * 1.01, None)


class Planted(nn.Module):
    def __init__(self, wrong_input: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, 4))
        self.wrong_input = wrong_input

    def forward(self, x):
        return ScaledSine.apply(x, self.weight, self.wrong_input)


def test_check_gradients_passes_cbam_and_leaves_it_alone():
    module = cbam.CBAM(8, 4, 3)
    before = copy.deepcopy(module.state_dict())
    report = check_gradients(module, torch.randn(1, 8, 4, 5))
    assert report.ok, str(report)
    assert [t.name for t in report.tensors] == ["input 0", "channel_att.fc1.weight", "channel_att.fc2.weight",
                                                "spatial_att.conv.weight"]
    assert all(t.max_rel < 1e-6 for t in report.tensors)
    assert [(c.name, c.passed) for c in report.checks] == [("gradcheck", True)]
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_check_gradients_with_gradgradcheck_on_the_reference():
    report = check_gradients(cbam.CBAM(8, 4, 3, impl="reference", preset="official").eval(),
                             torch.randn(1, 8, 3, 3), gradgrad=True, fast=True)
    assert report.ok and [c.name for c in report.checks] == ["gradcheck", "gradgradcheck"]


@pytest.mark.parametrize("fast", [False, True])
def test_check_gradients_catches_a_wrong_input_gradient(fast):
    report = check_gradients(Planted(wrong_input=True), torch.randn(3, 4), fast=fast)
    assert not report.ok and not report.checks[0].passed
    by_name = {t.name: t for t in report.tensors}
    assert not by_name["input 0"].ok and by_name["weight"].ok
    assert by_name["input 0"].max_rel == pytest.approx(0.01, rel=1e-3)  # the planted 1%
    assert "NO" in str(report) and "gradcheck: FAILED" in str(report)


def test_check_gradients_catches_a_wrong_parameter_gradient():
    report = check_gradients(Planted(wrong_input=False), torch.randn(3, 4))
    by_name = {t.name: t for t in report.tensors}
    assert not report.ok and by_name["input 0"].ok and not by_name["weight"].ok
    assert check_gradients(Planted(wrong_input=False), torch.randn(3, 4), params=False).ok


class PlantedPair(nn.Module):
    """``Planted`` on the second of a list of inputs, plus the first: inputs nested in a list."""

    def __init__(self):
        super().__init__()
        self.planted = Planted(wrong_input=True)

    def forward(self, pair):
        return pair[0] * 2 + self.planted(pair[1])


def test_check_gradients_checks_tensors_nested_in_lists():
    report = check_gradients(PlantedPair(), [torch.randn(3, 4), torch.randn(3, 4)], params=False)
    by_name = {t.name: t for t in report.tensors}
    assert list(by_name) == ["input 0.0", "input 0.1"]
    assert by_name["input 0.0"].ok and not by_name["input 0.1"].ok
    assert by_name["input 0.1"].max_rel == pytest.approx(0.01, rel=1e-3)  # the planted 1%
    levels = [torch.randn(1, 4, 3, 3), torch.randn(1, 2, 3, 3)]
    assert check_gradients(cbam.CrossLayerCBAM([4, 2], reduction_ratio=2, kernel_size=3), levels).ok


def test_check_gradients_refuses_a_check_that_would_take_hours():
    with pytest.raises(ValueError, match="at most 100 input and parameter elements, got 101.*fast=True"):
        check_gradients(nn.Identity(), torch.randn(101), max_elements=100)
    with pytest.raises(ValueError, match="a floating-point input or a parameter"):
        check_gradients(nn.Identity(), torch.arange(3))


# --- check_amp ----------------------------------------------------------------------------------

class Cancel(nn.Module):
    """``1 / (x - 1)`` after an identity Linear: fine in float32 at x = 1.001, 1/0 once x rounds to 1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(4))
            self.fc.bias.zero_()

    def forward(self, x):
        return 1 / (self.fc(x) - 1)


def test_check_amp_names_the_module_that_goes_non_finite_in_bfloat16():
    report = check_amp(nn.Sequential(nn.Identity(), Cancel(), nn.ReLU()), torch.full((2, 4), 1.001))
    assert report.dtype == "bfloat16" and not report.ok
    assert (report.fp32_inf, report.amp_inf) == (0, 8)
    assert (report.first_nonfinite.path, report.first_nonfinite.type) == ("1", "Cancel")
    assert report.first_nonfinite.inputs_finite
    assert "first non-finite output under autocast: 1 (Cancel)" in str(report)


@pytest.mark.parametrize("squash", [nn.ReLU, nn.Tanh])
def test_check_amp_finds_a_float16_overflow_that_bfloat16_does_not_have(squash):
    """4 * 1e4 * 2 = 8e4 overflows float16 (max 65504), not bfloat16 (3e38). Tanh hides the inf in
    the output (tanh(inf) = 1): the check still fails, and names the Linear."""
    model = nn.Sequential(nn.Linear(4, 4), squash())
    with torch.no_grad():
        model[0].weight.fill_(1e4)
        model[0].bias.zero_()
    x = torch.full((1, 4), 2.0)
    half = check_amp(model, x, dtype=torch.float16)
    assert not half.ok and half.first_nonfinite == NonFinite("0", "Linear", True)
    assert half.amp_inf == (4 if squash is nn.ReLU else 0)
    assert check_amp(model, x, dtype=torch.bfloat16).ok


def test_check_amp_blames_the_caller_when_inputs_were_already_bad():
    class Blowup(nn.Module):
        def __init__(self):
            super().__init__()
            self.after = nn.ReLU()

        def forward(self, x):
            return self.after(x.exp() * 1e38)  # inf in the forward's own code, not in a child

    report = check_amp(Blowup(), torch.full((3,), 200.0), locate=True)
    assert report.fp32_inf == 3  # not a mixed-precision problem
    assert report.first_nonfinite.path == "after" and not report.first_nonfinite.inputs_finite
    assert "already non-finite" in str(report)


def test_check_amp_on_a_resnet_with_cbam():
    model = cbam.models.resnet18().eval()
    before = copy.deepcopy(model.state_dict())
    report = check_amp(model, torch.randn(1, 3, 64, 64))
    assert report.ok and 0 < report.rel_error < report.rtol and report.first_nonfinite is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert json.loads(json.dumps(report.as_dict()))["ok"] is True


def test_check_amp_arguments():
    with pytest.raises(ValueError, match="expected float32 inputs, got \\['torch.float64'\\]"):
        check_amp(nn.Identity(), torch.randn(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.bfloat16 or torch.float16, got torch.float32"):
        check_amp(nn.Identity(), torch.randn(2), dtype=torch.float32)


def test_check_amp_compares_the_path_a_plain_call_takes():
    """Its locating hooks send a CBAM to its reference; the comparison must come from the fused path that an
    unhooked autocast call runs (bfloat16 conv output into a fused CBAM), computed here by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), cbam.CBAM(16, 4, 3, preset="timm", impl="fused")).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(x).float()
    expected = float((amp - full).norm() / full.norm())
    report = check_amp(model, x)
    assert report.rel_error == pytest.approx(expected, rel=1e-6) and report.first_nonfinite is None
