"""``to_timm``/``to_official``: our CBAM-ResNet keys in timm's and the official code's layouts.

Expectations are the other code's own key sets (timm's model; the official layout built in
``wild_checkpoints``) and logits; round trips must give back the very keys, order and values.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

import cbam
from cbam.convert import from_official, from_timm, to_official, to_timm

from wild_checkpoints import NUM_CLASSES, OfficialCBAM, assert_same_logits, perturb

torch.set_num_threads(2)


def ours(depth: int = 18, **kwargs):
    torch.manual_seed(0)
    return perturb(getattr(cbam.models, f"resnet{depth}")(num_classes=NUM_CLASSES, **kwargs), 5,
                   attention_only_params="cbam")


def timm_model(depth: int = 18):
    return timm.create_model(f"resnet{depth}", block_args={"attn_layer": "cbam"}, num_classes=NUM_CLASSES).eval()


def official_model():
    """The official ResidualNet(ImageNet, 18, 10, 'CBAM') layout (see ``wild_checkpoints.official_resnet``)."""
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            block.cbam = OfficialCBAM(block.bn2.num_features, 16)
            block.bn2.register_forward_hook(lambda module, inputs, out, cbam=block.cbam: cbam(out))
    return model.eval()


def assert_same_dict(got, expected):
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape and torch.equal(got[key], value), key


@pytest.mark.parametrize("depth", [18])  # ResNet-50 into timm: test_load_weights
def test_to_timm_gives_timms_keys_and_logits(depth):
    source = ours(depth, preset="timm")
    target = timm_model(depth)
    converted = to_timm(source.state_dict())
    assert list(converted) == list(target.state_dict())  # same keys in the same order: se slot, 1x1 convs
    target.load_state_dict(converted, strict=True)
    assert_same_logits(target, source)


def test_to_official_gives_the_official_keys_and_logits():
    source = ours(18, preset="official")
    target = official_model()
    converted = to_official(source.state_dict())
    assert sorted(converted) == sorted(target.state_dict())
    target.load_state_dict(converted, strict=True)
    assert_same_logits(target, source)
    weight = source.layer1[0].cbam.spatial_att.conv.weight
    assert torch.equal(converted["layer1.0.cbam.SpatialGate.spatial.conv.weight"], weight.flip(1))  # [max, mean]


@pytest.mark.parametrize(("preset", "there", "back"), [("timm", to_timm, from_timm),
                                                        ("official", to_official, from_official)])
def test_round_trips_are_equal(preset, there, back):
    state = ours(18, preset=preset).state_dict()
    assert_same_dict(back(there(state)), state)
    theirs = (timm_model() if preset == "timm" else official_model()).state_dict()
    assert_same_dict(there(back(theirs)), theirs)


def test_from_timm_renames_the_se_slot_of_a_whole_resnet_only():
    timm_state = timm_model().state_dict()
    converted = from_timm(timm_state)  # no attention_name: the keys say it is a timm ResNet
    target = cbam.models.resnet18(num_classes=NUM_CLASSES, preset="timm")
    target.load_state_dict(converted, strict=True)
    assert "layer1.0.se.channel_att.fc1.weight" in from_timm(timm_state, attention_name=None)
    assert "se.channel_att.fc1.weight" in from_timm({f"se.{k}": v for k, v in timm_model().layer1[0].se
                                                     .state_dict().items()})


@pytest.mark.parametrize(("convert", "kwargs", "message"), [
    (to_timm, {}, r"to_timm: the target layout's CBAM has a spatial BatchNorm .*preset='timm'.*; the CBAM at "
                  r"'layer1.0.cbam' has none \(no 'layer1.0.cbam.spatial_att.bn.weight'\)"),
    (to_official, {"preset": "timm"}, r"to_official: the target layout's CBAM has MLP biases"),
    (to_timm, {"preset": "timm", "spatial_conv": "factorized"},
     r"to_timm: 'layer1.0.cbam.spatial_att.conv.0.weight' has no equivalent in the target's CBAM"),
])
def test_layouts_the_target_cannot_hold_are_refused(convert, kwargs, message):
    torch.manual_seed(0)
    state = cbam.models.resnet18(**kwargs).state_dict()
    with pytest.raises(ValueError, match=message):
        convert(state)
