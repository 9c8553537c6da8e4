"""``load_weights`` of timm's and the official weights refuses a model whose CBAMs compute otherwise with them
(hard-sigmoid gates, the spatial gate first, other pooling): every key fits, so it used to load "strictly".

The expectation is the source model's own logits: a refused model, given the weights anyway through the key
rules and ``load_state_dict``, computes other logits; an accepted one computes the source's."""

from __future__ import annotations

import re

import pytest
import timm
import torch

import cbam
from cbam.convert import from_official, from_timm, load_weights

from wild_checkpoints import NUM_CLASSES, assert_same_logits, logits, official_resnet, perturb, timm_resnet

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def timm_cbam():
    return timm_resnet(18)


@pytest.fixture(scope="module")
def timm_light():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", block_args={"attn_layer": "lcbam"}, num_classes=NUM_CLASSES)
    return perturb(model, 5, attention_only_params=".se.")


@pytest.fixture(scope="module")
def official():
    return official_resnet(18)


def _resnet18(**options):
    torch.manual_seed(0)
    return cbam.models.resnet18(num_classes=NUM_CLASSES, **options)


def _computes_otherwise(model, source, rule) -> None:
    """The weights through the key rules, ``load_state_dict`` strict: every key fits, the logits differ."""
    model.load_state_dict(rule(source.state_dict()))
    assert (logits(model) - logits(source)).abs().max() > 1e-3


@pytest.mark.parametrize("options, named", [
    ({"gate": "hard-sigmoid"}, "a hard-sigmoid channel gate"),
    ({"order": "spatial-channel"}, "order='spatial-channel'"),
    ({"pool_types": ("avg", "max", "lp")}, "pool_types=('avg', 'max', 'lp') with spatial_pool='concat'"),
    ({"pool_types": ("mix",)}, "pool_types=('mix',) with spatial_pool='concat'"),
])
def test_timm_weights_into_a_cbam_of_other_options_are_refused(timm_cbam, options, named):
    model = _resnet18(preset="timm", **options)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"timm's CbamModule/LightCbamModule.*layer1\.0\.cbam computes with "
                                         rf".*{re.escape(named)}.*preset='timm'"):
        load_weights(timm_cbam.state_dict(), model)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())  # left unchanged
    _computes_otherwise(model, timm_cbam, from_timm)


def test_timm_light_weights_into_a_model_pooling_channels_apart_are_refused(timm_light):
    """The audit's case: one spatial map (as the light form) but avg and max channel descriptors apart."""
    model = _resnet18(preset="timm", spatial_pool="mix")
    with pytest.raises(ValueError, match=r"pool_types=\('avg', 'max'\) with spatial_pool='mix'"):
        load_weights(timm_light.state_dict(), model)
    _computes_otherwise(model, timm_light, from_timm)


def test_timm_light_weights_into_light_cbams_load(timm_light):
    model = _resnet18(preset="timm", pool_types=("mix",), spatial_pool="mix")
    load_weights(timm_light.state_dict(), model)
    assert_same_logits(model, timm_light)


@pytest.mark.parametrize("options, named", [
    ({"gate": "hard-sigmoid"}, "hard-sigmoid"),
    ({"order": "spatial-channel"}, "order='spatial-channel'"),
    ({"pool_types": ("avg", "lse")}, r"pool_types=\('avg', 'lse'\)"),
])
def test_official_weights_into_a_cbam_of_other_options_are_refused(official, options, named):
    model = _resnet18(preset="official", **options)
    with pytest.raises(ValueError, match=rf"the official CBAM code.*computes with .*{named}.*preset='official'"):
        load_weights(official.state_dict(), model)
    _computes_otherwise(model, official, from_official)


def test_official_weights_into_the_official_preset_load(official):
    model = _resnet18(preset="official")
    load_weights(official.state_dict(), model)
    assert_same_logits(model, official)


def test_our_weights_are_not_checked_they_carry_no_options():
    source = _resnet18(preset="timm", gate="hard-sigmoid")
    model = _resnet18(preset="timm", gate="hard-sigmoid")
    report = load_weights(source.state_dict(), model)
    assert report.layout.name == "cbam" and report.loaded == len(model.state_dict())
