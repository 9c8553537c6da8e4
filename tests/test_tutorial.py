"""The tutorial in shared/seed/000_7333a5830c2d3487.txt, run against our classes.

Its snippets lost ``=``, ``+``, ``:``, quotes and ``@`` when scraped; only those are restored
below. Their class definitions of ``ChannelAttention``, ``SpatialAttention`` and ``CBAM`` are
replaced by imports of ours (drop-in compatible); every other snippet is kept as written, with a
comment naming its section. Where the tutorial is wrong (missing downsample, gradcheck,
visualisation, ``DynamicCBAM``) the tests pin the failure and show the right way.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F  # §4 uses F without importing it
from torch import nn
from torch.autograd.gradcheck import GradcheckError

from cbam import CBAM, ChannelAttention, SpatialAttention


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Deterministic weights; one CPU thread, as thread start-up dominates on these tiny tensors."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- §1 环境准备与基础概念: the shape-printing helper -------------------------------------------
def print_shape(tensor, name):
    print(f"{name} shape: {tensor.shape}")


# --- §2 通道注意力模块实现: the body of ChannelAttention.forward ---------------------------------
def tutorial_channel_forward(self, x):
    avg_out = self.mlp(self.avg_pool(x))
    max_out = self.mlp(self.max_pool(x))
    channel_weights = self.sigmoid(avg_out + max_out)
    return x * channel_weights


# --- §2: the debug prints suggested for ChannelAttention.forward ---------------------------------
def tutorial_channel_debug(self, x):
    print_shape(self.avg_pool(x), "After avg pool")
    print_shape(self.mlp(self.avg_pool(x)), "After MLP")


# --- §3 空间注意力模块实现: the body of SpatialAttention.forward ---------------------------------
def tutorial_spatial_forward(self, x):
    # 沿通道维度计算均值和最大值
    avg_out = torch.mean(x, dim=1, keepdim=True)
    max_out, _ = torch.max(x, dim=1, keepdim=True)
    # 拼接后卷积
    spatial_weights = self.sigmoid(
        self.conv(torch.cat([avg_out, max_out], dim=1))
    )
    return x * spatial_weights


# --- §3: the forward's first lines, then the debug prints suggested around the conv --------------
def tutorial_spatial_debug(self, x):
    avg_out = torch.mean(x, dim=1, keepdim=True)
    max_out, _ = torch.max(x, dim=1, keepdim=True)
    concat = torch.cat([avg_out, max_out], dim=1)
    print_shape(concat, "After concat")
    print_shape(self.conv(concat), "After conv")


# --- §4 完整CBAM模块集成: the body of CBAM.forward -------------------------------------------------
def tutorial_cbam_forward(self, x):
    x = self.channel_att(x)
    x = self.spatial_att(x)
    return x


# --- §4: 集成应用示例 -----------------------------------------------------------------------------
# 在ResNet块中应用CBAM
class ResBlockWithCBAM(nn.Module):
    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.cbam = CBAM(out_channels)
        # 下采样逻辑...

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.cbam(out)  # 应用CBAM
        out += identity
        return F.relu(out)


# --- §5 实战调试技巧与性能优化: 初始化策略 (a method-body fragment; wrapped to take ``self``) -------
def tutorial_he_init(self):
    # 对卷积层使用He初始化
    for m in self.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out')


# --- §5: 可视化注意力权重 ------------------------------------------------------------------------
def visualize_attention(model, input_tensor):
    with torch.no_grad():
        # 获取通道注意力权重
        channel_weights = model.channel_att(input_tensor)  # noqa: F841 (verbatim)
        # 获取空间注意力权重
        spatial_weights = model.spatial_att(channel_att_output)  # noqa: F821, F841 (verbatim)
        # 使用matplotlib绘制热力图...


# --- §5: 混合精度训练兼容性. The tutorial's bare ``autocast()`` is ``torch.cuda.amp.autocast`` (CUDA
# only); on CPU the same decorator is ``torch.autocast("cpu", dtype=torch.bfloat16)``.
class AutocastCBAM(CBAM):
    @torch.autocast("cpu", dtype=torch.bfloat16)
    def forward(self, x):
        # 确保模块支持AMP
        return super().forward(x)


# --- §6 进阶应用与变体: 并行结构变体 --------------------------------------------------------------
class ParallelCBAM(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.channel_att = ChannelAttention(in_channels)
        self.spatial_att = SpatialAttention()

    def forward(self, x):
        channel_out = self.channel_att(x)
        spatial_out = self.spatial_att(x)
        return (channel_out + spatial_out) / 2


# --- §6: 跨层连接 --------------------------------------------------------------------------------
class CrossLayerCBAM(nn.Module):
    def __init__(self, in_channels_list):
        super().__init__()
        self.cbams = nn.ModuleList([
            CBAM(ch) for ch in in_channels_list
        ])

    def forward(self, features):
        return [cbam(feat) for cbam, feat in zip(self.cbams, features)]


# --- §6: 动态参数调整 ----------------------------------------------------------------------------
class DynamicCBAM(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.reduction_ratio = nn.Parameter(torch.tensor(16.))
        self.kernel_size = nn.Parameter(torch.tensor(7.))

    def forward(self, x):
        ratio = torch.clamp(self.reduction_ratio, 8, 32).int()
        kernel = torch.clamp(self.kernel_size, 3, 7).int()
        return CBAM(x.size(1), ratio, kernel)(x)


def tutorial_view(module):
    """Our module under the tutorial's attribute names (``avg_pool``, ``mlp``, ``conv``, ``sigmoid``).

    Our ChannelAttention keeps its shared MLP as ``fc1``/``fc2`` Linear layers, not the tutorial's
    ``mlp`` of 1x1 convs, so the §2 snippets that read ``self.mlp`` run on this view: the same
    weights reshaped to 1x1 convs. If the §2 forward on it equals ours, the two MLPs are one.
    """
    if isinstance(module, SpatialAttention):
        return SimpleNamespace(conv=module.conv, sigmoid=nn.Sigmoid())
    c, hidden = module.in_channels, module.hidden_channels
    mlp = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, c, 1, bias=False))
    with torch.no_grad():
        mlp[0].weight.copy_(module.fc1.weight[:, :, None, None])
        mlp[2].weight.copy_(module.fc2.weight[:, :, None, None])
    return SimpleNamespace(avg_pool=nn.AdaptiveAvgPool2d(1), max_pool=nn.AdaptiveMaxPool2d(1), mlp=mlp,
                           sigmoid=nn.Sigmoid())


def printed(capsys):
    return capsys.readouterr().out.splitlines()


# §1
def test_print_shape_prints_the_shape_of_a_cbam_output(capsys):
    """§1: ``print_shape`` on a CBAM output prints the input's shape (CBAM keeps the shape)."""
    x = torch.randn(2, 32, 9, 7)
    print_shape(CBAM(32)(x), "CBAM out")
    assert printed(capsys) == [f"CBAM out shape: {torch.Size(x.shape)}"]


# §2
def test_channel_debug_prints_pooled_and_mlp_shapes(capsys):
    """§2 debug prints: after avg pool and after the MLP, both ``(B, C, 1, 1)``."""
    b, c, h, w = 3, 32, 6, 5
    tutorial_channel_debug(tutorial_view(ChannelAttention(c)), torch.randn(b, c, h, w))
    pooled = torch.Size((b, c, 1, 1))
    assert printed(capsys) == [f"After avg pool shape: {pooled}", f"After MLP shape: {pooled}"]


def test_channel_forward_matches_the_tutorial_formula():
    """§2 forward ``x * sigmoid(mlp(avg) + mlp(max))`` (1x1-conv MLP) equals our ChannelAttention."""
    ca = ChannelAttention(64, 16)
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(ca(x), tutorial_channel_forward(tutorial_view(ca), x))


# §3
def test_spatial_debug_prints_concat_and_conv_shapes(capsys):
    """§3 debug prints: after concat ``(B, 2, H, W)``, after the conv ``(B, 1, H, W)`` (size kept)."""
    b, c, h, w = 2, 16, 11, 7
    for k in (3, 7):
        tutorial_spatial_debug(tutorial_view(SpatialAttention(k)), torch.randn(b, c, h, w))
        assert printed(capsys) == [f"After concat shape: {torch.Size((b, 2, h, w))}",
                                   f"After conv shape: {torch.Size((b, 1, h, w))}"]


def test_spatial_forward_matches_the_tutorial_formula():
    """§3 forward ``x * sigmoid(conv(cat[mean_c, max_c]))`` on our ``.conv`` equals our SpatialAttention."""
    for k in (3, 7):
        sa = SpatialAttention(k)
        x = torch.randn(2, 16, 10, 12)
        torch.testing.assert_close(sa(x), tutorial_spatial_forward(tutorial_view(sa), x))


# §4
def test_cbam_forward_is_channel_then_spatial():
    """§4 ``CBAM.forward``: ``spatial_att(channel_att(x))`` through our ``.channel_att``/``.spatial_att``."""
    model = CBAM(64, 16, 7)
    assert isinstance(model.channel_att, ChannelAttention)
    assert isinstance(model.spatial_att, SpatialAttention)
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(model(x), tutorial_cbam_forward(model, x))


def test_resblock_runs_when_shapes_match():
    """§4 ResBlockWithCBAM with in == out channels and stride 1: output shaped like the input, >= 0."""
    x = torch.randn(2, 32, 8, 8)
    out = ResBlockWithCBAM(32, 32)(x)
    assert out.shape == x.shape
    assert (out >= 0).all()


@pytest.mark.parametrize("in_channels, out_channels, stride", [(32, 32, 2), (32, 64, 1), (32, 64, 2)])
def test_resblock_without_downsample_cannot_add_the_identity(in_channels, out_channels, stride):
    """§4's bug: "下采样逻辑..." is left out, so ``out += identity`` fails when the shape changes."""
    block = ResBlockWithCBAM(in_channels, out_channels, stride)
    with pytest.raises(RuntimeError):
        block(torch.randn(2, in_channels, 8, 8))


# §5
def test_he_init_reaches_the_spatial_conv():
    """§5 He init loop re-initialises our spatial conv (fan_out = 49: std ~ sqrt(2/49)).

    It leaves the channel MLP alone (``nn.Linear``, not ``nn.Conv2d``), but that MLP is already
    He (fan_out) initialised by ``ChannelAttention.reset_parameters``.
    """
    model = CBAM(64)
    fc1 = model.channel_att.fc1.weight.detach().clone()
    samples = []
    for _ in range(200):
        with torch.no_grad():
            model.spatial_att.conv.weight.zero_()
        tutorial_he_init(model)
        samples.append(model.spatial_att.conv.weight.detach().clone())
    weights = torch.stack(samples)
    assert torch.isfinite(weights).all() and (weights != 0).all()
    assert weights.std().item() == pytest.approx((2 / 49) ** 0.5, rel=0.05)
    assert torch.equal(model.channel_att.fc1.weight, fc1)


def test_gradcheck_snippet_fails():
    """§5 gradcheck as written cannot pass: float32 input and a fresh random CBAM at every call.

    The input is shrunk from 1x64x32x32 to 1x64x2x2: gradcheck perturbs every input element, so
    65536 elements would take far too long; 256 fail the same way.
    """
    with pytest.warns(UserWarning, match="double precision"), pytest.raises(GradcheckError):
        # 检查梯度是否正常传播
        print(torch.autograd.gradcheck(
            lambda x: CBAM(64)(x),
            torch.randn(1, 64, 2, 2, requires_grad=True)
        ))


def test_gradcheck_fails_with_a_fresh_module_even_in_float64():
    """A new random CBAM per call is a different function each time: float64 alone does not help."""
    x = torch.randn(1, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    assert not torch.autograd.gradcheck(lambda x: CBAM(16, dtype=torch.float64)(x), x, raise_exception=False)


def test_gradcheck_passes_for_one_fixed_float64_module():
    """The fix: build the module once, in float64, and check it on a float64 input."""
    model = CBAM(16, dtype=torch.float64)
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, x)


def test_visualize_attention_reads_features_and_uses_an_undefined_name():
    """§5 visualisation: ``channel_att(x)`` gives features, not weights; ``channel_att_output`` is undefined."""
    model = CBAM(32)
    x = torch.randn(2, 32, 8, 8) * 3
    channel_weights = model.channel_att(x)  # what the snippet calls the weights
    assert channel_weights.shape == x.shape  # (B, C, H, W), not (B, C, 1, 1)
    assert ((channel_weights <= 0) | (channel_weights >= 1)).any()  # not in (0, 1): these are x * weights
    with pytest.raises(NameError, match="channel_att_output"):
        visualize_attention(model, x)


def test_attention_gives_the_weights_to_visualise():
    """The right way: ``.attention()`` returns the gates, in (0, 1); the forward multiplies by them."""
    model = CBAM(32)
    b, c, h, w = 2, 32, 8, 6
    x = torch.randn(b, c, h, w) * 3
    with torch.no_grad():
        channel = model.channel_att.attention(x)
        maps = model.attention(x)
        assert channel.shape == (b, c, 1, 1)
        assert ((channel > 0) & (channel < 1)).all()
        torch.testing.assert_close(model.channel_att(x), x * channel)
        assert maps.spatial.shape == (b, 1, h, w)
        assert ((maps.spatial > 0) & (maps.spatial < 1)).all()
        torch.testing.assert_close(maps.channel, channel)
        # what the snippet meant: the spatial gate of the channel attention's output
        torch.testing.assert_close(maps.spatial, model.spatial_att.attention(model.channel_att(x)))


def test_autocast_forward_is_close_to_float32():
    """§5 mixed precision: the autocast-decorated forward works. The reference runs its linear and conv layers
    in bfloat16, close to float32; the fused path (``impl="auto"``'s choice where a compiled engine runs)
    computes the gates in float32 under autocast and returns float32 input as float32."""
    model = AutocastCBAM(64)
    x = torch.randn(2, 64, 16, 16)
    reference = CBAM.forward(model, x)
    model.impl = "reference"
    out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    error = (out.float() - reference).norm() / reference.norm()
    assert 0 < error.item() < 2e-2  # > 0: the linear and conv layers really ran in bfloat16
    model.impl = "fused"
    fused = model(x)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


# §6
def test_parallel_cbam_averages_the_two_refined_features():
    """§6 ParallelCBAM: ``(x * Mc(x) + x * Ms(x)) / 2``, both gates taken from the same ``x``."""
    model = ParallelCBAM(32)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        mc, ms = model.channel_att.attention(x), model.spatial_att.attention(x)
        torch.testing.assert_close(model(x), (x * mc + x * ms) / 2)


def test_cross_layer_cbam_refines_each_feature_with_its_own_cbam():
    """§6 CrossLayerCBAM: one CBAM per level, each output shaped like its input."""
    channels = [16, 32, 64]
    model = CrossLayerCBAM(channels)
    features = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(channels)]
    outputs = model(features)
    assert [o.shape for o in outputs] == [f.shape for f in features]
    for cbam, feat, out in zip(model.cbams, features, outputs):
        torch.testing.assert_close(out, cbam(feat))


def test_dynamic_cbam_runs_but_cannot_learn():
    """§6's bug: DynamicCBAM's ``.int()`` cuts the gradient and each call builds a new random CBAM."""
    dyn = DynamicCBAM(32)
    x = torch.randn(2, 32, 8, 8)
    out = dyn(x)  # 0-d int tensors as reduction_ratio / kernel_size: our CBAM accepts them
    assert out.shape == x.shape
    out.sum().backward()
    assert dyn.reduction_ratio.grad is None
    assert dyn.kernel_size.grad is None
    assert len(list(dyn.parameters())) == 2  # the CBAM's own weights are never registered
    assert not torch.allclose(dyn(x), dyn(x))
