"""cbam.viz: capture from every CBAM-family module, figures decoded back, Grad-CAM, the pointing game."""

import subprocess
import sys

import numpy as np
import pytest
import timm
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
    pointing_game,
    save_figure,
    select_layers,
    upsample_maps,
)

torch.set_num_threads(2)
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
RESNET18_LAYERS = [f"layer{stage}.{block}.cbam" for stage in (1, 2, 3, 4) for block in (0, 1)]


def hook_count(model):
    return sum(len(module._forward_hooks) for module in model.modules())


def applied(module, x):
    """``module(x)`` and the maps ``capture_attention`` recorded for it."""
    with capture_attention(module) as records:
        out = module(x)
    return out, records[""]


@pytest.fixture(scope="module")
def resnet_records():
    torch.manual_seed(0)
    model = cbam.models.resnet18().eval()
    with capture_attention(model) as records, torch.no_grad():
        model(X)
    return records


# --- capture ---------------------------------------------------------------------------------------------------


def test_one_record_per_cbam_in_resnet18_with_shapes_and_ranges(resnet_records):
    assert list(resnet_records) == RESNET18_LAYERS
    sides = {1: 16, 2: 8, 3: 4, 4: 2}  # 64x64 input: stride 4, 8, 16, 32
    for name, record in resnet_records.items():
        stage = int(name[5])
        assert record.channel.shape == (2, 64 * 2 ** (stage - 1))
        assert record.spatial.shape == (2, 1, sides[stage], sides[stage])
        for maps in record:
            assert maps.device.type == "cpu" and not maps.requires_grad
            assert 0 < maps.min() and maps.max() < 1


def test_records_are_the_gates_the_model_applied():
    """Each CBAM's output is its input times the recorded channel and spatial gates."""
    torch.manual_seed(0)
    model = cbam.models.resnet18(preset="official").eval()
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, cbam.CBAM):
            module.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, (i[0], o)))
    with capture_attention(model) as records, torch.no_grad():
        model(X)
    assert list(records) == list(seen) == RESNET18_LAYERS
    for name, (x, out) in seen.items():
        channel, spatial = records[name]
        torch.testing.assert_close(out, x * channel[:, :, None, None] * spatial)


def test_hooks_are_removed_on_exit_and_on_error():
    model = cbam.add_cbam(torchvision.models.resnet18(weights=None))  # add_cbam's own 8 hooks stay
    before = hook_count(model)
    with capture_attention(model):
        assert hook_count(model) == before + 8
    assert hook_count(model) == before
    with pytest.raises(KeyError), capture_attention(model):
        raise KeyError("boom")
    assert hook_count(model) == before


def test_add_cbam_torchvision_resnet18():
    model = cbam.add_cbam(torchvision.models.resnet18(weights=None)).eval()
    with capture_attention(model) as records, torch.no_grad():
        model(X)
    assert list(records) == RESNET18_LAYERS
    assert records["layer4.1.cbam"].spatial.shape == (2, 1, 2, 2)


@pytest.mark.parametrize("attn", ["cbam", "lcbam"])  # CbamModule, LightCbamModule
def test_timm_resnet_with_attn_layer(attn):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, block_args={"attn_layer": attn}).eval()
    with capture_attention(model) as records, torch.no_grad():
        model(X)
    assert list(records) == [name.replace(".cbam", ".se") for name in RESNET18_LAYERS]
    se = model.layer2[0].se
    x = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        out, (channel, spatial) = applied(se, x)
    torch.testing.assert_close(out, x * channel[:, :, None, None] * spatial)


@pytest.mark.parametrize("module", [
    cbam.CBAM(16, 4),
    cbam.CBAM(16, 4, order="spatial-channel"),
    cbam.LightCBAM(16, 4),
    cbam.DynamicCBAM(16, kernel_sizes=(3, 7), reduction_ratios=(2, 4)),
], ids=["cbam", "spatial-first", "light", "dynamic"])
def test_sequential_variants_record_the_applied_gates(module):
    x = torch.randn(3, 16, 9, 11)
    out, (channel, spatial) = applied(module, x)
    assert channel.shape == (3, 16) and spatial.shape == (3, 1, 9, 11)
    torch.testing.assert_close(out, x * channel[:, :, None, None] * spatial)


def test_parallel_cbam():
    module, x = cbam.ParallelCBAM(16, 4), torch.randn(3, 16, 9, 11)
    out, (channel, spatial) = applied(module, x)
    torch.testing.assert_close(out, (x * channel[:, :, None, None] + x * spatial) / 2)


def test_cross_layer_levels_and_nested_paths():
    model = nn.Sequential(nn.Identity(), cbam.CrossLayerCBAM([8, 16]))
    with capture_attention(model) as records:
        model([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)])
    assert list(records) == ["1.cbams.0", "1.cbams.1"]
    assert records["1.cbams.1"].spatial.shape == (2, 1, 4, 4)


@pytest.mark.parametrize("dims, shape", [(1, (2, 8, 20)), (3, (2, 8, 4, 6, 5))])
def test_1d_and_3d(dims, shape):
    _, (channel, spatial) = applied(cbam.CBAM(8, 2, dims=dims), torch.randn(shape))
    assert channel.shape == (2, 8) and spatial.shape == (2, 1, *shape[2:])


def test_train_mode_leaves_batchnorm_statistics_alone():
    """Capturing runs each BatchNorm once, as an uncaptured twin does: the same running statistics, to
    float32 rounding (captured blocks apply their BatchNorm first, with torch's batch statistics; the
    twin's fold it into CBAM's pooling pass). A second update would move them by momentum x mean."""
    torch.manual_seed(0)
    model = cbam.models.resnet18(preset="timm").train()
    twin = cbam.models.resnet18(preset="timm").train()
    twin.load_state_dict(model.state_dict())
    with capture_attention(model) as records:
        model(X)
    twin(X)
    assert records["layer1.0.cbam"].spatial.shape == (2, 1, 16, 16)
    for (name, mine), theirs in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7, msg=name)


def test_each_forward_replaces_the_record_and_keyword_calls_work():
    module = cbam.CBAM(8, 2)
    with capture_attention(module) as records:
        module(torch.randn(4, 8, 6, 6))
        module(x=torch.randn(1, 8, 5, 5))
    assert records[""].spatial.shape == (1, 1, 5, 5)


def test_capture_errors():
    with pytest.raises(ValueError, match="no CBAM-family module in ResNet"):
        with capture_attention(cbam.models.resnet18(attention=None)):
            pass
    with pytest.raises(TypeError, match="expects an nn.Module"):
        with capture_attention("resnet18"):
            pass


def test_select_layers(resnet_records):
    assert list(select_layers(resnet_records, ["layer4"])) == ["layer4.0.cbam", "layer4.1.cbam"]
    assert list(select_layers(resnet_records, ["layer3.1.cbam", "layer1"])) == [
        "layer1.0.cbam", "layer1.1.cbam", "layer3.1.cbam"]  # capture order
    assert list(select_layers(resnet_records, None)) == RESNET18_LAYERS
    with pytest.raises(ValueError, match="unknown layer 'layer5'; captured layers: 'layer1.0.cbam'"):
        select_layers(resnet_records, ["layer5"])
    with pytest.raises(TypeError, match="sequence of layer names"):
        select_layers(resnet_records, "layer4")


def test_import_needs_neither_matplotlib_nor_pillow():
    code = "import sys, cbam.viz; print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'PIL'}))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"


# --- figures ---------------------------------------------------------------------------------------------------


def decoded(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def test_figure_png_decodes_and_is_not_trivial(resnet_records, tmp_path):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    figure = attention_figure(image, resnet_records, index=1, heatmaps={"extra": torch.rand(4, 4)})
    path = save_figure(figure, tmp_path / "attention.png")
    pixels = decoded(path)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 800
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # colour overlays, not flat
    assert [p.name for p in tmp_path.iterdir()] == ["attention.png"]  # no temporary file left


def test_svg_and_pdf_by_extension(resnet_records, tmp_path):
    figure = attention_figure(torch.rand(1, 64, 64), resnet_records, layers=["layer4.1.cbam"])
    svg = save_figure(figure, tmp_path / "a.svg").read_text()
    assert "<svg" in svg and "layer4.1.cbam" in svg
    assert save_figure(figure, tmp_path / "a.PDF").read_bytes().startswith(b"%PDF")


def test_save_is_atomic(tmp_path):
    class Failing:
        def savefig(self, file, **kwargs):
            file.write(b"half a figure")
            raise RuntimeError("disk full")

    path = tmp_path / "keep.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(Failing(), path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.png"]
    with pytest.raises(ValueError, match=r"must end in .png, .svg or .pdf, got '.*a.jpg'"):
        save_figure(Failing(), tmp_path / "a.jpg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_figure(Failing(), tmp_path / "missing" / "a.png")


def test_overlay_of_a_constant_map_draws(tmp_path):
    from matplotlib.figure import Figure

    figure = Figure()
    draw_overlay(figure.subplots(), torch.rand(3, 20, 30), torch.full((5, 5), 0.5))
    assert decoded(save_figure(figure, tmp_path / "flat.png")).std() > 10


def test_figure_errors(resnet_records):
    image = torch.rand(3, 64, 64)
    with pytest.raises(ValueError, match="index must be < 2"):
        attention_figure(image, resnet_records, index=2)
    with pytest.raises(ValueError, match=r"image must be a tensor \(3, H, W\)"):
        attention_figure(torch.rand(64, 64, 3), resnet_records)
    with pytest.raises(ValueError, match="run the model inside capture_attention"):
        attention_figure(image, {})
    cbam_1d = cbam.CBAM(8, 2, dims=1)
    with capture_attention(cbam_1d) as records_1d:
        cbam_1d(torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match="figures draw 2-D attention"):
        attention_figure(image, records_1d)


# --- Grad-CAM --------------------------------------------------------------------------------------------------


def test_grad_cam_matches_the_closed_form_of_a_linear_head():
    """With global average pooling then a linear layer, d score / d A_k = W[c, k] / (h w) everywhere."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4)).eval()
    x = torch.randn(2, 3, 5, 7)
    cam = grad_cam(model, x, "1", class_index=2)
    features = model[:2](x).detach()
    expected = torch.relu(torch.einsum("k,bkhw->bhw", model[4].weight[2] / 35, features))
    torch.testing.assert_close(cam.maps, expected)
    assert cam.classes.tolist() == [2, 2]
    assert all(p.grad is None for p in model.parameters()) and hook_count(model) == 0
    top = grad_cam(model, x, "1")
    assert top.classes.tolist() == model(x).argmax(1).tolist()


def test_grad_cam_on_resnet18_and_errors():
    model = cbam.models.resnet18(num_classes=10).eval()
    cam = grad_cam(model, X, "layer4")
    assert cam.maps.shape == (2, 2, 2) and cam.maps.min() >= 0
    with pytest.raises(ValueError, match="ResNet has no submodule 'layer9'"):
        grad_cam(model, X, "layer9")
    with pytest.raises(ValueError, match="class_index must be < 10"):
        grad_cam(model, X, "layer4", class_index=10)
    with pytest.raises(ValueError, match="4-D tensor"):
        grad_cam(model, X, "fc")


# --- pointing game ---------------------------------------------------------------------------------------------


def test_pointing_game_on_maps_at_image_size():
    """Peaks at known pixels; half-open boxes; chance = mean box area / image area, by hand."""
    maps = torch.zeros(3, 1, 6, 10)  # image 6 x 10 (H x W)
    maps[0, 0, 3, 5] = 1  # row 3, col 5
    maps[1, 0, 0, 9] = 1
    maps[2, 0, 5, 0] = 1
    boxes = [
        (5, 3, 6, 4),  # 1 x 1 box exactly on the peak: hit
        (0, 0, 9, 6),  # x1 = 9 excludes col 9: miss
        (0, 5, 2, 6),  # row 5, cols 0..1: hit
    ]
    result = pointing_game(maps, boxes, (6, 10))
    assert result.hits.tolist() == [True, False, True]
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.chance == pytest.approx((1 + 54 + 2) / 3 / 60)


def test_pointing_game_upsamples_to_the_image():
    """A 4x4 map with one hot cell, upsampled x2 (bilinear), peaks in that cell's 2x2 patch of the 8x8 image."""
    maps = torch.full((2, 4, 4), 0.5)
    maps[0, 1, 2] = 0.9  # image rows 2-3, cols 4-5
    maps[1, 3, 0] = 0.9  # image rows 6-7, cols 0-1
    boxes = torch.tensor([[4, 2, 6, 4], [2, 6, 8, 8]])
    result = pointing_game(maps, boxes, 8)
    assert result.hits.tolist() == [True, False]
    assert result.chance == pytest.approx((4 + 12) / 2 / 64)
    assert upsample_maps(maps, 8).shape == (2, 8, 8)


def test_pointing_game_errors():
    maps = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"boxes\[1\] = \[0.0, 0.0, 9.0, 4.0\] must satisfy 0 <= x0 < x1 <= W = 8"):
        pointing_game(maps, [(0, 0, 2, 2), (0, 0, 9, 4)], 8)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        pointing_game(maps, [(3, 0, 3, 2), (0, 0, 1, 1)], 8)  # empty: x0 == x1
    with pytest.raises(ValueError, match=r"\(N, 4\) = \(2, 4\)"):
        pointing_game(maps, [(0, 0, 2, 2)], 8)
    with pytest.raises(ValueError, match="non-empty 2-D maps"):
        pointing_game(torch.rand(2, 3, 4, 4), [(0, 0, 2, 2)] * 2, 8)
    with pytest.raises(ValueError, match=r"int or a pair \(H, W\)"):
        pointing_game(maps, [(0, 0, 2, 2)] * 2, (8, 8, 8))
