"""cbam.profile: parameter and FLOP counts against hand-derived formulas; benchmark structure and memory."""

import json

import pytest
import torch
from torch import nn

import cbam
from cbam.profile import benchmark, cost, is_attention, saved_bytes
from cbam.profile.benchmark import interleaved_samples


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def conv(cin: int, cout: int, k: int, side: int) -> int:
    """FLOPs of a k x k convolution producing a side x side map (batch 1): 2 per multiply-add."""
    return 2 * cin * cout * k * k * side * side


def cbam_flops(b: int, c: int, side: int, r: int = 16, k: int = 7, pools: int = 2) -> int:
    """The paper's CBAM on (b, c, side, side), counted op by op under cbam.profile's convention."""
    n, h = side * side, c // r
    mlp = 2 * (2 * pools * b * c * h)   # fc1 and fc2 on each pooled descriptor: 2 FLOPs per multiply-add
    spatial_conv = 2 * b * n * 2 * k * k  # one output map from 2 input maps
    channel = pools * b * c * n + pools * b * h + pools * b * c + b * c + b * c * n  # pools, relu, sum, gate, x*Mc
    spatial = 2 * b * c * n + b * n + b * c * n  # channel-wise mean and max, gate, y*Ms
    return mlp + spatial_conv + channel + spatial


def cbam_params(c: int, r: int = 16, k: int = 7) -> int:
    return 2 * c * (c // r) + 2 * k * k


def resnet18_conv_flops(side: int) -> int:
    """torchvision's ResNet-18 on (1, 3, side, side): every conv and the fc, written out."""
    s = side // 2  # stem conv, stride 2
    total = conv(3, 64, 7, s)
    s //= 2  # max-pool
    total += 4 * conv(64, 64, 3, s)
    for cin, cout in ((64, 128), (128, 256), (256, 512)):
        s //= 2
        total += conv(cin, cout, 3, s) + 3 * conv(cout, cout, 3, s) + conv(cin, cout, 1, s)  # + downsample
    return total + 2 * 512 * 1000


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_cbam_flops_and_params_match_the_formula(impl):
    module = cbam.CBAM(64, impl=impl)
    report = cost(module, torch.randn(2, 64, 8, 8))
    assert report.params == sum(p.numel() for p in module.parameters()) == cbam_params(64)
    assert report.flops == report.attention_flops == cbam_flops(2, 64, 8)
    assert report.conv_matmul_flops == 2 * (2 * 2 * 2 * 64 * 4) + 2 * 2 * 64 * 2 * 49
    assert module.impl == impl  # switched to the reference for counting, and back


def test_spatial_batchnorm_counts_two_per_element():
    report = cost(cbam.CBAM(64, preset="official").eval(), torch.randn(2, 64, 8, 8))
    assert report.flops == cbam_flops(2, 64, 8) + 2 * 2 * 64


def test_resnet18_without_attention_is_its_convolutions():
    model = cbam.models.resnet18(attention=None).eval()
    report = cost(model, torch.randn(1, 3, 64, 64))
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.flops == report.conv_matmul_flops == resnet18_conv_flops(64)
    assert report.multiply_adds == resnet18_conv_flops(64) // 2
    assert (report.attention_params, report.attention_flops) == (0, 0)


def test_resnet18_with_cbam_adds_exactly_its_eight_cbams():
    report = cost(cbam.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    stages = [(64, 16), (128, 8), (256, 4), (512, 2)]  # (channels, side) of each stage, two blocks each
    assert report.attention_flops == sum(2 * cbam_flops(1, c, side) for c, side in stages)
    assert report.flops == resnet18_conv_flops(64) + report.attention_flops
    assert report.attention_params == sum(2 * cbam_params(c) for c, _ in stages)
    rows = {row.path: row for row in report.modules}
    assert rows["layer3.1.cbam"].flops == cbam_flops(1, 256, 4) and rows["layer3.1.cbam"].attention
    assert rows["layer3.1.cbam.channel_att.fc1"].attention and not rows["layer3.1.conv1"].attention
    children = [row for row in report.modules if row.path and "." not in row.path]
    assert sum(row.flops for row in children) == rows[""].flops == report.flops
    assert "layer1.0.cbam" in report.format(depth=3) and "layer1.0.cbam" not in str(report)


def test_cbam_share_of_resnet50_at_224_is_small_but_not_zero():
    report = cost(cbam.models.resnet50().eval(), torch.randn(1, 3, 224, 224))
    assert 0 < report.attention_flops / report.flops < 0.01
    assert 0.05 < report.attention_params / report.params < 0.15  # the MLPs of wide stages: 2C^2/16 each
    # torchvision lists ResNet-50 at 4.09 GFLOPs in multiply-adds; the CBAMs' MLPs and convs add ~6M
    assert 4.08e9 < report.multiply_adds < 4.11e9


def test_timm_cbam_is_recognised_and_counted_like_ours():
    from timm.layers.cbam import CbamModule

    timm_module, ours = CbamModule(16), cbam.CBAM(16, preset="timm")
    assert is_attention(timm_module) and is_attention(ours.channel_att) and not is_attention(nn.Conv2d(1, 1, 1))
    x = torch.randn(2, 16, 4, 4)
    theirs, mine = cost(timm_module, x), cost(ours, x)
    assert theirs.attention_flops == theirs.flops > 0
    # the same work, except that timm adds the two MLP outputs (B*C) where we sum the stack (P*B*C)
    assert mine.flops - theirs.flops == 2 * 16


def test_shared_parameters_count_once_and_json_export():
    layer = nn.Linear(8, 8)
    report = cost(nn.Sequential(layer, nn.ReLU(), layer), torch.randn(2, 8))
    assert report.params == 72 and report.flops == 2 * (2 * 2 * 8 * 8)
    assert [row.calls for row in report.modules] == [1, 2, 1]
    assert json.loads(json.dumps(report.as_dict()))["multiply_adds"] == 2 * 2 * 8 * 8


def test_cost_rejects_a_non_module():
    with pytest.raises(TypeError, match="cost expects an nn.Module, got Tensor"):
        cost(torch.zeros(1))


# --- benchmark ----------------------------------------------------------------------------------

class Square(nn.Module):
    def forward(self, x):
        return x * x  # saves x twice: one storage


class SigmoidGate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)  # saves x, and sigmoid's output (for both its backward and the product)


def test_saved_bytes_are_counted_by_storage():
    x = torch.randn(3, 5)
    assert saved_bytes(Square(), x) == 15 * 4
    assert saved_bytes(SigmoidGate(), x) == 2 * 15 * 4
    assert saved_bytes(SigmoidGate(), x.double()) == 2 * 15 * 8
    assert saved_bytes(nn.Linear(5, 7), x) == 15 * 4  # the input; the weight is a parameter, left out


def test_benchmark_compares_modules_in_one_run():
    modules = {"k=3": cbam.CBAM(16, kernel_size=3), "k=7": cbam.CBAM(16)}
    report = benchmark(modules, torch.randn(2, 16, 8, 8), warmup=1, repeats=3)
    assert [row.name for row in report.rows] == ["k=3", "k=7"]
    assert all(row.forward_ms > 0 and row.train_ms > 0 and row.saved_bytes > 0 for row in report.rows)
    assert all(row.peak_bytes is None for row in report.rows) and report.device == "cpu"
    assert all(p.grad is None for m in modules.values() for p in m.parameters())
    text = str(report)
    assert "k=7" in text and "median of 3 after 1 warm-up" in text
    assert json.loads(json.dumps(report.as_dict()))["rows"][1]["name"] == "k=7"


def test_benchmark_one_module_forward_only():
    report = benchmark(Square(), torch.randn(4), warmup=0, repeats=1, backward=False)
    assert [(row.name, row.train_ms, row.saved_bytes) for row in report.rows] == [("Square", None, 16)]


def test_benchmark_arguments():
    with pytest.raises(TypeError, match="non-empty"):
        benchmark({}, torch.randn(1))
    with pytest.raises(TypeError, match="nn.Module values, got int for 'a'"):
        benchmark({"a": 1}, torch.randn(1))
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        benchmark(Square(), torch.randn(1), repeats=0)


def test_interleaved_rounds_take_turns_to_start():
    """Every run once per round, each round starting one run later, so no run always follows the same one."""
    order = []
    runs = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = interleaved_samples(runs, repeats=4, warmup=1)
    assert order == list("abc" "abc" "bca" "cab" "abc")
    assert {name: len(times) for name, times in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for times in samples.values() for t in times)
