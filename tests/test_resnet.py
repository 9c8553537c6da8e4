"""``cbam.models`` ResNets: torchvision's keys and outputs, CBAM's place, paper sizes, init, timm interplay.

Expectations come from outside the code under test: torchvision's and timm's own ResNets, the CBAM
paper's parameter table, each block recomposed here from its parts in the paper's order, and the
official code's key layout re-stated in this file.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import timm
import torch
import torchvision
from timm.layers.cbam import CbamModule
from torch import nn

from cbam import CBAM
from cbam.convert import from_official, from_timm
from cbam.models import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152

SEED = 0
BUILDERS = {18: resnet18, 34: resnet34, 50: resnet50, 101: resnet101, 152: resnet152}
CBAMS_PER_DEPTH = {18: 8, 34: 16, 50: 16, 101: 33, 152: 50}


def _randomise(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random BN affine and statistics everywhere, random CBAM parameters; convs keep their (He) init.

    Keeping the convs' scale keeps a 50-layer network's activations finite while every BN and
    attention tensor still differs from its default, so a mis-loaded key changes the output.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(3)
        for name, param in model.named_parameters():
            if {"cbam", "se"} & set(name.split(".")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def _image(gen: torch.Generator, batch: int = 1, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=gen)


def _assert_logits_close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to ``rel`` times the logits' scale (float32 summation order differs between models)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=rel * expected.abs().max().item())


# ---------------------------------------------------------------------------------- torchvision keys


@pytest.mark.parametrize("depth", list(BUILDERS))
def test_plain_model_has_torchvision_keys_and_shapes(depth):
    """``attention=None``: the same state-dict keys, in the same order, with the same shapes (meta tensors)."""
    with torch.device("meta"):
        theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
        ours = BUILDERS[depth](attention=None).state_dict()
    assert list(ours) == list(theirs)
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]


@pytest.mark.parametrize("depth", list(BUILDERS))
def test_cbam_model_misses_only_attention_keys_from_torchvision(depth):
    """torchvision weights load non-strictly into a CBAM model with only the ``*.cbam.*`` keys missing."""
    with torch.device("meta"):
        theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
        model = BUILDERS[depth]()
    result = model.load_state_dict(theirs, strict=False)
    attention_keys = [key for key in model.state_dict() if ".cbam." in key]
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(attention_keys)
    assert len({key.split(".cbam.")[0] for key in attention_keys}) == CBAMS_PER_DEPTH[depth]


@pytest.mark.parametrize("depth", [18, 50])
def test_plain_model_computes_as_torchvision(depth):
    """torchvision's (randomised) weights load strictly and give the same logits in eval mode."""
    gen = torch.Generator().manual_seed(SEED)
    theirs = _randomise(getattr(torchvision.models, f"resnet{depth}")(weights=None), gen).eval()
    ours = BUILDERS[depth](attention=None).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = _image(gen, batch=2)
    with torch.no_grad():
        _assert_logits_close(ours(x), theirs(x), rel=1e-5)


# -------------------------------------------------------------------------------------------- blocks


def _recomposed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The paper's block written out from the block's parts: CBAM after the last BN, before the addition."""
    relu = torch.relu
    if isinstance(block, Bottleneck):
        out = relu(block.bn2(block.conv2(relu(block.bn1(block.conv1(x))))))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(relu(block.bn1(block.conv1(x)))))
    shortcut = x if block.downsample is None else block.downsample[1](block.downsample[0](x))
    return relu(block.cbam(out) + shortcut)


BLOCKS = [  # (block class, in_channels, channels, stride, downsample expected)
    pytest.param(BasicBlock, 32, 32, 1, False, id="basic-identity"),
    pytest.param(BasicBlock, 32, 32, 2, True, id="basic-stride2"),
    pytest.param(BasicBlock, 16, 32, 1, True, id="basic-widen"),
    pytest.param(Bottleneck, 128, 32, 1, False, id="bottleneck-identity"),
    pytest.param(Bottleneck, 32, 32, 1, True, id="bottleneck-widen"),
    pytest.param(Bottleneck, 64, 32, 2, True, id="bottleneck-stride2"),
]


@pytest.mark.parametrize(("block_cls", "in_channels", "channels", "stride", "projects"), BLOCKS)
def test_block_applies_cbam_to_the_residual_branch_before_the_addition(
    block_cls, in_channels, channels, stride, projects
):
    """Output equals the recomposed block; the shortcut is a 1x1 stride-s conv + BN exactly when shape changes."""
    gen = torch.Generator().manual_seed(SEED)
    out_channels = channels * block_cls.expansion
    attention = partial(CBAM, reduction_ratio=4, preset="official")
    block = block_cls(in_channels, channels, stride, attention, dtype=torch.float64)
    _randomise(block, gen).eval()
    x = torch.randn(2, in_channels, 9, 10, generator=gen, dtype=torch.float64)

    assert (block.downsample is not None) == projects
    if projects:
        conv, bn = block.downsample
        assert (conv.kernel_size, conv.stride, conv.in_channels, conv.out_channels) == (
            (1, 1), (stride, stride), in_channels, out_channels)
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == out_channels
    assert block.cbam.channel_att.in_channels == out_channels
    with torch.no_grad():
        got = block(x)
        assert got.shape == (2, out_channels, math.ceil(9 / stride), math.ceil(10 / stride))
        torch.testing.assert_close(got, _recomposed(block, x), rtol=0, atol=1e-12)
        plain = block_cls(in_channels, channels, stride, dtype=torch.float64).eval()
        plain.load_state_dict(block.state_dict(), strict=False)
        assert not torch.allclose(plain(x), got), "the CBAM should change the block's output"


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_block_trains_through_the_residual_tail(impl):
    """In training mode (batch-statistics BatchNorms) the block's output and every gradient equal the
    recomposed block's, where the ReLU, the addition and CBAM are separate ops."""
    gen = torch.Generator().manual_seed(SEED)
    block = _randomise(Bottleneck(32, 16, 2, partial(CBAM, reduction_ratio=4, preset="timm", impl=impl),
                                  dtype=torch.float64), gen).train()
    x = torch.randn(2, 32, 9, 10, generator=gen, dtype=torch.float64)
    upstream = torch.randn(2, 64, 5, 5, generator=gen, dtype=torch.float64)
    found = []
    for forward in (block, lambda inputs: _recomposed(block, inputs)):
        leaf = x.clone().requires_grad_()
        out = forward(leaf)
        found.append([out, *torch.autograd.grad(out, [leaf, *block.parameters()], upstream)])
    for got, want in zip(*found):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_hooks_on_the_cbam_see_its_own_output_and_change_nothing():
    """Unwatched, the block runs ``cbam(out, shortcut)`` (the tail in CBAM's output pass); a forward
    hook on ``block.cbam`` gets CBAM's own output, and the block's output is bitwise the same."""
    gen = torch.Generator().manual_seed(SEED)
    block = _randomise(Bottleneck(64, 16, 1, partial(CBAM, reduction_ratio=4, preset="timm")), gen).eval()
    x = torch.randn(2, 64, 12, 12, generator=gen)
    with torch.no_grad():
        unwatched = block(x)
        seen = []
        handle = block.cbam.register_forward_hook(lambda module, inputs, output: seen.append((inputs, output)))
        watched = block(x)
        handle.remove()
        (inputs, output), = seen
        assert len(inputs) == 1
        torch.testing.assert_close(output, block.cbam(inputs[0]), rtol=0, atol=0)
    assert torch.equal(watched, unwatched)
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: seen.append((inputs, output)) if module is block.cbam else None)
    try:
        with torch.no_grad():  # a global hook watches CBAM's parts too: the reference runs, equal up to rounding
            torch.testing.assert_close(block(x), unwatched)
    finally:
        handle.remove()
    (inputs, output), = seen  # a global hook watches too
    assert len(inputs) == 1


def test_block_takes_any_attention_module():
    """An attention that is not a ``CBAM`` (here timm's) is applied before the addition, as CBAM is."""
    gen = torch.Generator().manual_seed(SEED)
    block = _randomise(Bottleneck(64, 16, 1, lambda channels, **factory: CbamModule(channels, rd_ratio=1 / 4)),
                       gen).double().eval()
    x = torch.randn(2, 64, 6, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _recomposed(block, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", list(BUILDERS))
def test_every_block_holds_one_cbam_over_its_output_channels(depth):
    """One ``CBAM`` per residual block, at ``block.cbam``, sized to the block's output channels."""
    with torch.device("meta"):
        model = BUILDERS[depth]()
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == CBAMS_PER_DEPTH[depth]
    assert sum(isinstance(m, CBAM) for m in model.modules()) == len(blocks)
    for block in blocks:
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert isinstance(block.cbam, CBAM)
        assert block.cbam.channel_att.in_channels == last_bn.num_features


# ----------------------------------------------------------------------------------- sizes and stems

PAPER_PARAMS = [  # Woo et al. 2018, Table 4 (ImageNet-1K, 1000 classes), in millions
    pytest.param(18, "cbam", 11.78, id="resnet18-cbam"),
    pytest.param(34, "cbam", 21.96, id="resnet34-cbam"),
    pytest.param(50, "cbam", 28.09, id="resnet50-cbam"),
    pytest.param(101, "cbam", 49.33, id="resnet101-cbam"),
    pytest.param(18, None, 11.69, id="resnet18"),
    pytest.param(34, None, 21.80, id="resnet34"),
    pytest.param(50, None, 25.56, id="resnet50"),
    pytest.param(101, None, 44.55, id="resnet101"),
]


@pytest.mark.parametrize(("depth", "attention", "millions"), PAPER_PARAMS)
def test_official_preset_parameter_count_matches_the_paper(depth, attention, millions):
    """The paper's ImageNet table, to its 0.01M precision (official CBAM: MLP biases, spatial BN)."""
    preset = "official" if attention else None
    with torch.device("meta"):
        model = BUILDERS[depth](attention=attention, preset=preset)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def _layer4_size(model: ResNet, x: torch.Tensor) -> tuple[int, int]:
    sizes = []
    handle = model.layer4.register_forward_hook(lambda module, args, out: sizes.append(tuple(out.shape[2:])))
    with torch.no_grad():
        model(x)
    handle.remove()
    return sizes[0]


def test_cifar_stem_keeps_32px_inputs_meaningful():
    """CIFAR stem: 3x3 stride-1 conv, no max-pool, 32x32 -> 4x4 after layer4 (ImageNet stem: 1x1)."""
    gen = torch.Generator().manual_seed(SEED)
    cifar = resnet18(num_classes=10, stem="cifar").eval()
    imagenet = resnet18(num_classes=10).eval()
    x = _image(gen, batch=2, size=32)

    assert (cifar.conv1.kernel_size, cifar.conv1.stride, cifar.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in cifar.modules())
    assert _layer4_size(cifar, x) == (4, 4)
    assert _layer4_size(imagenet, x) == (1, 1)
    assert cifar(x).shape == (2, 10)


def test_cbam_options_reach_every_block():
    """``preset`` and CBAM keywords configure every CBAM; ``dtype`` every layer."""
    model = resnet18(num_classes=7, preset="timm", reduction_ratio=8, kernel_size=3, dtype=torch.float64)
    for cbam_module in (m for m in model.modules() if isinstance(m, CBAM)):
        channels = cbam_module.channel_att.in_channels
        assert cbam_module.channel_att.hidden_channels == channels // 8
        assert cbam_module.spatial_att.kernel_size == 3
        assert cbam_module.spatial_att.bn is not None
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.fc.out_features == 7


# -------------------------------------------------------------------------------------------- init


def test_initialisation_follows_the_official_code():
    """He-normal convs (fan_out) and fc (fan_in), BN 1/0, spatial-gate BN weight 0: every spatial gate is 0.5."""
    torch.manual_seed(SEED)
    model = resnet50(preset="official").eval()
    conv = model.layer3[1].conv2.weight  # 256 * 256 * 9 weights
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)
    shortcut = model.layer4[0].downsample[0].weight  # 2048 x 1024 x 1 x 1
    assert shortcut.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.02)
    assert model.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.02)
    assert not model.fc.bias.any()

    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            in_spatial_gate = any(module is c.spatial_att.bn for c in cbams)
            assert torch.equal(module.weight, torch.full_like(module.weight, 0.0 if in_spatial_gate else 1.0))
            assert not module.bias.any()
    assert all(not c.channel_att.fc1.bias.any() and not c.channel_att.fc2.bias.any() for c in cbams)

    maps = []
    hooks = [c.register_forward_hook(lambda module, args, out: maps.append(module.attention(args[0]).spatial))
             for c in cbams]
    with torch.no_grad():
        model(_image(torch.Generator().manual_seed(SEED)))
    for hook in hooks:
        hook.remove()
    assert len(maps) == 16
    assert all(torch.equal(m, torch.full_like(m, 0.5)) for m in maps)


# ---------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        pytest.param({"attention": "se"}, ValueError, ["attention", "'cbam'", "'se'"], id="attention"),
        pytest.param({"stem": "cifar10"}, ValueError, ["stem", "'imagenet'", "'cifar'", "'cifar10'"], id="stem"),
        pytest.param({"num_classes": 0}, ValueError, ["num_classes", ">= 1", "0"], id="num-classes-zero"),
        pytest.param({"num_classes": 10.0}, TypeError, ["num_classes", "10.0"], id="num-classes-float"),
        pytest.param({"attention": None, "preset": "timm"}, ValueError, ["attention=None", "preset"],
                     id="preset-without-attention"),
        pytest.param({"attention": None, "reduction_ratio": 8}, ValueError, ["attention=None", "reduction_ratio"],
                     id="cbam-option-without-attention"),
        pytest.param({"reduction_ratio": 0}, ValueError, ["reduction_ratio", "0"], id="bad-cbam-option"),
        pytest.param({"preset": "tim"}, ValueError, ["preset", "'tim'"], id="bad-preset"),
    ],
)
def test_bad_arguments_raise_naming_expected_and_got(kwargs, error, words):
    with pytest.raises(error) as info:
        resnet18(**kwargs)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("args", "error", "words"),
    [
        pytest.param((nn.Conv2d, (2, 2, 2, 2)), ValueError, ["block", "BasicBlock", "Conv2d"], id="block"),
        pytest.param((BasicBlock, (2, 2, 2)), TypeError, ["layers", "4 block counts", "(2, 2, 2)"], id="layers-3"),
        pytest.param((BasicBlock, (2, 2, 0, 2)), ValueError, ["layers[2]", ">= 1", "0"], id="layers-zero"),
    ],
)
def test_resnet_class_checks_block_and_layers(args, error, words):
    with pytest.raises(error) as info:
        ResNet(*args)
    for word in words:
        assert word in str(info.value)


# -------------------------------------------------------------------------------------------- timm


def test_cbam_is_a_timm_attn_layer():
    """``timm.create_model(..., block_args=dict(attn_layer=CBAM))``: a CBAM in every block, dtype passed on."""
    model = timm.create_model(
        "resnet50", pretrained=False, block_args=dict(attn_layer=CBAM), dtype=torch.float64
    ).eval()
    blocks = [m for m in model.modules() if isinstance(m, timm.models.resnet.Bottleneck)]
    assert len(blocks) == 16
    for block in blocks:
        assert isinstance(block.se, CBAM)
        assert block.se.channel_att.in_channels == block.bn3.num_features
    assert sum(isinstance(m, CBAM) for m in model.modules()) == 16
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        logits = model(_image(torch.Generator().manual_seed(SEED)).double())
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_timm_cbam_resnet50_converts_to_ours_with_equal_logits():
    """timm's resnet50 with ``attn_layer="cbam"`` -> ``from_timm(attention_name="cbam")`` -> ours, strictly."""
    gen = torch.Generator().manual_seed(SEED)
    theirs = _randomise(timm.create_model("resnet50", pretrained=False, block_args=dict(attn_layer="cbam")), gen)
    ours = resnet50(attention="cbam", preset="timm")
    converted = from_timm(theirs.state_dict(), attention_name="cbam")

    assert sorted(converted) == sorted(ours.state_dict())
    ours.load_state_dict(converted, strict=True)
    x = _image(gen, batch=2)
    with torch.no_grad():
        _assert_logits_close(ours.eval()(x), theirs.eval()(x))


def test_from_timm_attention_name_renames_only_cbam_holders():
    """Only the attribute holding a CBAM is renamed; the rest, and the CBAMs' own names, as with
    ``attention_name=None`` (every prefix kept)."""
    source = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer="cbam")).state_dict()
    kept, renamed = from_timm(source, attention_name=None), from_timm(source, attention_name="attn")
    assert list(renamed) == [key.replace(".se.", ".attn.") for key in kept]
    assert all(torch.equal(renamed[new], kept[old]) for new, old in zip(renamed, kept))
    assert sum(key.endswith(".attn.channel_att.fc1.weight") for key in renamed) == 8


@pytest.mark.parametrize(
    ("name", "error", "words"),
    [
        pytest.param("layer.cbam", ValueError, ["attention_name", "'layer.cbam'"], id="dotted"),
        pytest.param("", ValueError, ["attention_name", "''"], id="empty"),
        pytest.param(3, TypeError, ["attention_name", "3", "int"], id="int"),
    ],
)
def test_from_timm_attention_name_must_be_an_attribute_name(name, error, words):
    source = timm.create_model("resnet18", pretrained=False, block_args=dict(attn_layer="cbam")).state_dict()
    with pytest.raises(error) as info:
        from_timm(source, attention_name=name)
    for word in ["from_timm", *words]:
        assert word in str(info.value)


def test_from_timm_attention_name_refuses_a_top_level_cbam():
    """A single module's dict has no attribute holding the CBAM to rename."""
    source = CbamModule(32).state_dict()
    with pytest.raises(ValueError, match="top level"):
        from_timm(source, attention_name="cbam")


# ---------------------------------------------------------------------------------------- official

# Our CBAM keys -> the official repository's (MODELS/cbam.py); its ResNet keys are otherwise torchvision's.
TO_OFFICIAL = {
    "channel_att.fc1.": "ChannelGate.mlp.1.",
    "channel_att.fc2.": "ChannelGate.mlp.3.",
    "spatial_att.conv.": "SpatialGate.spatial.conv.",
    "spatial_att.bn.": "SpatialGate.spatial.bn.",
}


def _to_official(state_dict):
    """Our official-preset ResNet's dict in the official naming; its ChannelPool stacks [max, mean]: flip."""
    converted = {}
    for key, value in state_dict.items():
        head, sep, tail = key.partition(".cbam.")
        for ours, theirs in TO_OFFICIAL.items():
            if sep and tail.startswith(ours):
                tail = theirs + tail[len(ours):]
                value = value.flip(1) if tail == "SpatialGate.spatial.conv.weight" else value
                break
        converted[head + sep + tail] = value
    return converted


def test_official_resnet_dict_converts_back_with_equal_logits():
    """An official-named dict made from our model converts back to it exactly and computes the same."""
    gen = torch.Generator().manual_seed(SEED)
    source = _randomise(resnet18(preset="official"), gen).eval()
    official = _to_official(source.state_dict())
    assert "layer1.0.cbam.ChannelGate.mlp.1.weight" in official
    assert "layer4.1.cbam.SpatialGate.spatial.bn.running_var" in official
    assert not any("channel_att" in key or "spatial_att" in key for key in official)

    converted = from_official(official)
    assert list(converted) == list(source.state_dict())
    for key, value in source.state_dict().items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0, msg=key)
    restored = resnet18(preset="official")
    restored.load_state_dict(converted, strict=True)
    x = _image(gen, batch=2)
    with torch.no_grad():
        _assert_logits_close(restored.eval()(x), source(x), rel=1e-6)
