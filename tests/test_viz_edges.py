"""cbam.viz against independent computations: gates by hand in float64, textbook Grad-CAM, bilinear
upsampling by formula, edge inputs (constant and NaN maps, in-place layers, EXIF, 16-bit images)."""

import copy

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import cbam
from cbam.viz import (
    attention_figure,
    capture_attention,
    draw_overlay,
    grad_cam,
    load_image,
    pointing_game,
    upsample_maps,
)

import naive

torch.set_num_threads(2)


def batch_norm(bn, z):
    """Textbook BatchNorm over ``(B, 1, *spatial)``: batch statistics in training, running ones in eval."""
    if bn.training:
        mean, var = z.mean(), z.var(unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (z - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def spatial_gate(y, weight, bn, pool, gate):
    maps = torch.stack([y.mean(1), y.amax(1)], 1)
    if pool == "mix":
        maps = maps.mean(1, keepdim=True)
    z = naive.conv_same(maps, weight)
    return naive.GATES[gate](z if bn is None else batch_norm(bn, z))


def hand_gates(module, x):
    """``(channel (B, C), spatial (B, 1, H, W))`` of a CBAM, ParallelCBAM or DynamicCBAM, from its weights."""
    if isinstance(module, cbam.DynamicCBAM):
        probs = torch.softmax(module.reduction_logits / module.temperature, 0)
        mask = sum(p * (torch.arange(module.fc1.out_features) < h) for p, h in zip(probs, module.hidden_widths))
        flat = x.flatten(2)
        hidden = [naive.POOLS[kind](flat) @ module.fc1.weight.T for kind in module.pool_types]
        channel = naive.GATES[module.gate](sum((h.clamp(min=0) * mask) @ module.fc2.weight.T for h in hidden))
        largest = max(module.kernel_sizes)
        kernel = torch.zeros(1, 2, largest, largest, dtype=x.dtype)
        kernel_probs = torch.softmax(module.kernel_logits / module.temperature, 0)
        for p, w in zip(kernel_probs, module.kernels):
            start = (largest - w.shape[-1]) // 2
            kernel[..., start:start + w.shape[-2], start:start + w.shape[-1]] += p * w
        return channel, spatial_gate(x * channel[:, :, None, None], kernel, module.bn, "concat", module.gate)
    ca, sa = module.channel_att, module.spatial_att

    def channel_of(v):
        logits = naive.channel_logits(v, ca.fc1.weight, ca.fc2.weight, ca.fc1.bias, ca.fc2.bias, ca.pool_types)
        return naive.GATES[ca.gate](logits).flatten(1)

    def spatial_of(v):
        return spatial_gate(v, sa.conv.weight, sa.bn, sa.pool, sa.gate)

    if isinstance(module, cbam.ParallelCBAM):
        return channel_of(x), spatial_of(x)
    if module.order == "spatial-channel":
        spatial = spatial_of(x)
        return channel_of(x * spatial), spatial
    channel = channel_of(x)
    return channel, spatial_of(x * channel[:, :, None, None])


MODULES = {
    "cbam": lambda: cbam.CBAM(16, 4),
    "timm": lambda: cbam.CBAM(16, 4, preset="timm"),
    "official-spatial-first": lambda: cbam.CBAM(16, 4, 5, preset="official", order="spatial-channel"),
    "light": lambda: cbam.LightCBAM(16, 4, preset="timm"),
    "hard-sigmoid": lambda: cbam.CBAM(16, 4, 3, preset="timm", gate="hard-sigmoid"),
    "parallel": lambda: cbam.ParallelCBAM(16, 4, preset="official"),
    "dynamic": lambda: cbam.DynamicCBAM(16, (3, 5), (2, 4), spatial_norm=True, temperature=0.7),
}


def randomised(module):
    """``module`` in float64 with random logits and running statistics, so that nothing sits at its init."""
    torch.manual_seed(0)
    module = module.double()
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("logits") or name.endswith("bn.bias"):
                parameter.normal_()
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    return module


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", MODULES)
def test_captured_gates_are_the_hand_computed_gates(kind, training):
    """Recorded gates = the formulas on the module's weights; the output and the state are as without capture."""
    module = randomised(MODULES[kind]()).train(training)
    twin = copy.deepcopy(module)
    x = torch.randn(3, 16, 7, 9, dtype=torch.float64)
    expected = hand_gates(module, x)
    with torch.no_grad():
        with capture_attention(module) as records:
            out = module(x)
        reference = twin(x)
    torch.testing.assert_close(records[""].channel, expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(records[""].spatial, expected[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    for (name, mine), theirs in zip(module.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_cross_layer_levels_are_hand_computed():
    module = randomised(cbam.CrossLayerCBAM([8, 16], preset="official")).train()
    features = [torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(2, 16, 3, 5, dtype=torch.float64)]
    expected = [hand_gates(level, x) for level, x in zip(module.cbams, features)]
    with capture_attention(module) as records, torch.no_grad():
        module(features)
    for (channel, spatial), record in zip(expected, records.values()):
        torch.testing.assert_close(record.channel, channel, rtol=0, atol=1e-12)
        torch.testing.assert_close(record.spatial, spatial, rtol=0, atol=1e-12)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gates_of_a_cbam_called_with_input_norm(training):
    """``cbam(x, input_norm=bn)`` is CBAM of ``bn(x)``: the recorded gates are those of ``bn(x)``."""
    module, bn = randomised(cbam.CBAM(8, 2, preset="timm")), randomised(nn.BatchNorm2d(8))
    module.train(training), bn.train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.normal_()
    twin, twin_bn = copy.deepcopy((module, bn))
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    y = ((x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps) * bn.weight[:, None, None]
         + bn.bias[:, None, None]).detach()
    channel, spatial = hand_gates(module, y)
    with torch.no_grad():
        with capture_attention(module) as records:
            out = module(x, input_norm=bn)
        reference = twin(x, input_norm=twin_bn)
    torch.testing.assert_close(records[""].channel, channel, rtol=0, atol=1e-12)
    torch.testing.assert_close(records[""].spatial, spatial, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, y * channel[:, :, None, None] * spatial)
    torch.testing.assert_close(out, reference)
    for mine, theirs in zip([*module.buffers(), *bn.buffers()], [*twin.buffers(), *twin_bn.buffers()]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-15)


def test_gates_of_an_in_place_call_are_those_of_its_input():
    """``inplace=True`` lets the fused path write its output over ``x``: the gates are of the input, not that."""
    module = randomised(cbam.CBAM(16, 4, impl="fused")).float().eval()
    x = torch.randn(2, 16, 6, 6)
    channel, spatial = hand_gates(module.double(), x.double())
    module.float()
    with capture_attention(module) as records, torch.no_grad():
        module(x.clone(), inplace=True)
    torch.testing.assert_close(records[""].channel.double(), channel, rtol=0, atol=1e-6)
    torch.testing.assert_close(records[""].spatial.double(), spatial, rtol=0, atol=1e-6)


def test_every_hook_is_removed_when_the_forward_raises():
    model = cbam.models.resnet18(num_classes=4)
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with pytest.raises(ValueError, match="expects a 4-D input"), capture_attention(model):
        model.layer1[0].cbam(torch.randn(2, 64, 8))
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before


# --- upsampling ------------------------------------------------------------------------------------------------


def bilinear(maps, height, width):
    """``align_corners=False`` bilinear by its formula: source coordinate ``(i + 0.5) * in / out - 0.5``, clamped."""
    out = np.empty((len(maps), height, width))
    h, w = maps.shape[1:]

    def taps(i, n_in, n_out):
        source = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        low = min(int(source), n_in - 1)
        return low, min(low + 1, n_in - 1), source - low

    for row in range(height):
        r0, r1, fr = taps(row, h, height)
        for col in range(width):
            c0, c1, fc = taps(col, w, width)
            top = maps[:, r0, c0] * (1 - fc) + maps[:, r0, c1] * fc
            bottom = maps[:, r1, c0] * (1 - fc) + maps[:, r1, c1] * fc
            out[:, row, col] = top * (1 - fr) + bottom * fr
    return out


@pytest.mark.parametrize("h, w, size", [(2, 3, (5, 7)), (3, 3, 8), (4, 2, (3, 9)), (1, 1, (4, 5)), (5, 4, (5, 4))])
def test_upsampling_is_bilinear_on_pixel_centres(h, w, size):
    maps = torch.rand(2, 1, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    height, width = (size, size) if isinstance(size, int) else size
    expected = bilinear(maps[:, 0].numpy(), height, width)
    np.testing.assert_allclose(upsample_maps(maps, size).numpy(), expected, rtol=0, atol=1e-7)


def test_upsampling_keeps_constants_and_stays_within_the_range():
    """Bilinear weights are convex: a constant map stays that constant and no value leaves the map's range."""
    generator = torch.Generator().manual_seed(0)
    for value in (0.7, 0.1, 1 / 3, 0.9):
        assert torch.equal(upsample_maps(torch.full((1, 5, 5), value), (20, 31)), torch.full((1, 20, 31), value))
    maps = torch.sigmoid(8 * torch.randn(64, 1, 3, 5, generator=generator))
    up = upsample_maps(maps, (17, 29))
    assert (up.amin((1, 2)) >= maps.amin((1, 2, 3))).all() and (up.amax((1, 2)) <= maps.amax((1, 2, 3))).all()


# --- figures ---------------------------------------------------------------------------------------------------


def overlay(heatmap, image_size):
    """The ``(H, W)`` array ``draw_overlay`` hands to ``imshow`` as the heat layer."""
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    draw_overlay(ax, torch.rand(3, *image_size), heatmap)
    return ax.images[1].get_array()


def test_a_constant_map_draws_flat():
    """Nothing varies, so nothing is highlighted: every pixel at the bottom of the colour scale."""
    heat = overlay(torch.full((5, 5), 0.7), (20, 30))
    assert heat.shape == (20, 30) and np.all(heat == 0)


def test_a_nan_cell_leaves_the_rest_of_the_map_drawn():
    """Min-max scaling over the finite values; the NaN stays NaN (drawn transparent)."""
    heatmap = torch.tensor([[0.2, 0.6], [0.4, float("nan")]])
    heat = np.ma.filled(overlay(heatmap, (2, 2)).astype(float), np.nan)
    np.testing.assert_allclose(heat, [[0.0, 1.0], [0.5, np.nan]], atol=1e-6)
    module = cbam.CBAM(8, 2)
    with capture_attention(module) as records, torch.no_grad():
        module(torch.randn(1, 8, 2, 2))
    figure = attention_figure(torch.rand(3, 2, 2), records, heatmaps={"cam": heatmap})
    titles = [ax.get_title() for ax in figure.get_axes()]
    assert "cam\n0.20 to 0.60, has NaN" in titles


# --- pointing game ---------------------------------------------------------------------------------------------


def test_pointing_game_constant_map_peaks_at_the_top_left():
    """As documented: the first maximum in row-major order, also after upsampling."""
    maps = torch.full((2, 1, 5, 5), 0.7)
    result = pointing_game(maps, [(0, 0, 1, 1), (1, 0, 30, 20)], (20, 30))
    assert result.hits.tolist() == [True, False]


def test_pointing_game_refuses_nan_maps():
    maps = torch.rand(2, 1, 4, 4)
    maps[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"spatial_maps\[1\] holds NaN"):
        pointing_game(maps, [(3, 3, 4, 4)] * 2, 4)


# --- Grad-CAM --------------------------------------------------------------------------------------------------


def textbook_cam(model, x, layer, classes):
    """Grad-CAM image by image: ``A`` is the layer's output as it left the layer (a copy goes on, so in-place
    layers after it cannot change it); weights are the spatial means of d score / d A."""
    maps = []
    for image, target in zip(x, classes):
        kept = []

        def keep(module, inputs, output, kept=kept):
            kept.append(output.detach().requires_grad_())
            return kept[0].clone()

        handle = model.get_submodule(layer).register_forward_hook(keep)
        score = model(image[None])[0, target]
        handle.remove()
        (gradient,) = torch.autograd.grad(score, kept[0])
        maps.append(torch.relu((gradient.mean((2, 3), keepdim=True) * kept[0]).sum(1))[0].detach())
    return torch.stack(maps)


@pytest.mark.parametrize("layer", ["layer4", "layer4.1.bn1", "layer4.1.bn2"])  # bn1: ReLU(inplace); bn2: out +=
def test_grad_cam_is_the_textbook_map_of_the_layer_output(layer):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=6).double().eval()
    with torch.no_grad():
        model.fc.bias.zero_()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flags = [p.requires_grad for p in model.parameters()]
    cam = grad_cam(model, x, layer)
    assert cam.classes.tolist() == model(x).argmax(1).tolist() and len(set(cam.classes.tolist())) == 2
    torch.testing.assert_close(cam.maps, textbook_cam(model, x, layer, cam.classes).float())
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())


def test_grad_cam_of_a_model_in_training_mode_explains_it_in_eval_and_changes_nothing():
    """Batch statistics would mix the images and update the running ones: the forward runs in eval mode."""
    torch.manual_seed(0)
    model = cbam.models.resnet18(num_classes=4, preset="timm").train()
    model.layer2.eval()  # a mixed model: each module's own mode comes back
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 48, 48)
    cam = grad_cam(model, x, "layer4", class_index=1)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    torch.testing.assert_close(cam.maps, textbook_cam(copy.deepcopy(model).eval(), x, "layer4", [1, 1]))


# --- image files -----------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6: viewers rotate the stored pixels 90 degrees clockwise; so must the model's input."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = 255
    stored[:, :, 1] = np.arange(80, dtype=np.uint8)[None, :]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    shown = np.rot90(stored, k=-1)  # (80, 40, 3): the stored left half on top
    loaded = load_image(tmp_path / "photo.png", 40).pixels.permute(1, 2, 0).numpy()
    np.testing.assert_allclose(loaded, shown[20:60] / 255, atol=1e-6)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(values).save(tmp_path / "depth.png")
    loaded = load_image(tmp_path / "depth.png", 64).pixels
    expected = torch.from_numpy(values / 65535).float().expand(3, -1, -1)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0.5 / 255 + 1e-6)
