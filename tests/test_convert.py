"""``cbam.convert``: timm and official-code CBAM checkpoints load into ``cbam.CBAM`` and compute the same.

The timm side is checked against timm itself; the official side (Jongchan/attention-module,
``MODELS/cbam.py``) against a re-statement of its math written here with ``torch.nn.functional``
only, so that neither expectation comes from ``cbam.functional``.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from timm.layers.cbam import CbamModule, LightCbamModule
from torch import nn

from cbam import CBAM, LightCBAM
from cbam.convert import detect, from_official, from_timm, strip_wrappers, to_official, to_timm

SEED = 0
OFFICIAL_EPS, OFFICIAL_MOMENTUM = 1e-5, 0.01


def _randomise(module: nn.Module, gen: torch.Generator, *, batches: int = 7) -> nn.Module:
    """Every parameter random, every BN with random (positive-variance) stats and a batch count."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.5)
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
                bn.num_batches_tracked.fill_(batches)
    return module


def _snapshot(state_dict):
    """Keys, value objects and value copies, to check later that a dict was left alone."""
    return list(state_dict), [id(v) for v in state_dict.values()], [v.clone() for v in state_dict.values()]


def _assert_unmodified(state_dict, snapshot) -> None:
    keys, ids, values = snapshot
    assert list(state_dict) == keys
    assert [id(v) for v in state_dict.values()] == ids
    for value, before in zip(state_dict.values(), values):
        torch.testing.assert_close(value, before, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- timm


TIMM_CASES = [  # (channels, reduction, kernel, mlp_bias): C / 16 = 1.5 and 2.5 are timm's round-half-up cases
    pytest.param(32, 16, 7, False, id="C32-k7"),
    pytest.param(24, 16, 7, False, id="C24-half-up"),
    pytest.param(40, 16, 3, False, id="C40-half-up-k3"),
    pytest.param(20, 4, 3, True, id="C20-r4-k3-mlp-bias"),
]
TIMM_ARGS = ("channels", "reduction", "kernel", "mlp_bias")


def _timm_pair(channels: int, reduction: int, kernel: int, mlp_bias: bool):
    """A randomised timm ``CbamModule`` and our ``CBAM`` loaded (strictly) from its converted dict."""
    gen = torch.Generator().manual_seed(SEED)
    theirs = CbamModule(channels, rd_ratio=1 / reduction, spatial_kernel_size=kernel, mlp_bias=mlp_bias)
    theirs = _randomise(theirs, gen)
    ours = CBAM(channels, reduction, kernel_size=kernel, preset="timm", mlp_bias=mlp_bias)
    ours.load_state_dict(from_timm(theirs.state_dict()), strict=True)
    x = torch.randn(3, channels, 9, 11, generator=gen)
    return theirs, ours, x, gen


@pytest.mark.parametrize(TIMM_ARGS, TIMM_CASES)
def test_timm_eval_outputs_and_gradients_match(channels, reduction, kernel, mlp_bias):
    """Eval mode: same outputs, input gradients and (converted) parameter gradients as timm."""
    theirs, ours, x, gen = _timm_pair(channels, reduction, kernel, mlp_bias)
    theirs.eval()
    ours.eval()
    upstream = torch.randn(x.shape, generator=gen)
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_theirs, out_ours = theirs(x_theirs), ours(x_ours)
    out_theirs.backward(upstream)
    out_ours.backward(upstream)

    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=0, atol=1e-5)
    expected_grads = from_timm({name: p.grad for name, p in theirs.named_parameters()})
    got_grads = {name: p.grad for name, p in ours.named_parameters()}
    assert list(got_grads) == list(expected_grads)
    for name, grad in got_grads.items():
        # parameter gradients sum over every position: float32 sums in another order differ by ~1e-6 relative
        error = ((grad - expected_grads[name]).abs().max() / expected_grads[name].abs().max().clamp(min=1)).item()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize(TIMM_ARGS, TIMM_CASES)
def test_timm_train_outputs_and_running_stats_match(channels, reduction, kernel, mlp_bias):
    """Train mode: same outputs (batch statistics) and the same BN running-stat update as timm."""
    theirs, ours, x, _ = _timm_pair(channels, reduction, kernel, mlp_bias)
    theirs.train()
    ours.train()
    bn_before = ours.spatial_att.bn.running_mean.clone()

    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    assert not torch.equal(ours.spatial_att.bn.running_mean, bn_before), "the forward should update stats"
    expected = from_timm(theirs.state_dict())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        key = f"spatial_att.bn.{name}"
        torch.testing.assert_close(ours.state_dict()[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert int(ours.spatial_att.bn.num_batches_tracked) == 8


def test_timm_conversion_leaves_input_alone():
    """``from_timm`` builds a new dict; the timm dict keeps its keys and tensors."""
    theirs = _randomise(CbamModule(24), torch.Generator().manual_seed(SEED))
    state = theirs.state_dict()
    snapshot = _snapshot(state)
    from_timm(state)
    _assert_unmodified(state, snapshot)


# ----------------------------------------------------------------------------------------- official


class _OfficialCBAM(nn.Module):
    """The parameter layout of the official ``CBAM`` (structure only: its math is ``official_cbam``)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.ChannelGate = nn.Module()
        self.ChannelGate.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(channels, channels // reduction), nn.ReLU(),
            nn.Linear(channels // reduction, channels),
        )
        self.SpatialGate = nn.Module()
        self.SpatialGate.spatial = nn.Module()  # the official BasicConv(2, 1, 7, padding=3, relu=False)
        self.SpatialGate.spatial.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.SpatialGate.spatial.bn = nn.BatchNorm2d(1, eps=OFFICIAL_EPS, momentum=OFFICIAL_MOMENTUM)


def _official_state_dict(channels: int, reduction: int, gen: torch.Generator, dtype=torch.float64):
    """An official-keyed CBAM state dict of random tensors (BN stats included)."""
    return _randomise(_OfficialCBAM(channels, reduction).to(dtype), gen).state_dict()


def official_cbam(sd, x, pool_types, *, training: bool):
    """The official CBAM forward on state dict ``sd``: ``(output, new running_mean, new running_var)``."""

    def mlp(v):  # Flatten, Linear, ReLU, Linear
        hidden = F.relu(F.linear(v.flatten(1), sd["ChannelGate.mlp.1.weight"], sd["ChannelGate.mlp.1.bias"]))
        return F.linear(hidden, sd["ChannelGate.mlp.3.weight"], sd["ChannelGate.mlp.3.bias"])

    hw = (x.shape[2], x.shape[3])
    att = 0
    for kind in pool_types:
        if kind == "avg":
            pooled = F.avg_pool2d(x, hw, stride=hw)
        elif kind == "max":
            pooled = F.max_pool2d(x, hw, stride=hw)
        elif kind == "lp":
            pooled = F.lp_pool2d(x, 2, hw, stride=hw)
        else:  # "lse", as the official logsumexp_2d
            flat = x.view(x.shape[0], x.shape[1], -1)
            top = flat.max(dim=2, keepdim=True).values
            pooled = top + (flat - top).exp().sum(dim=2, keepdim=True).log()
        att = att + mlp(pooled)
    x = x * torch.sigmoid(att)[:, :, None, None].expand_as(x)

    pooled = torch.cat([x.max(1, keepdim=True).values, x.mean(1, keepdim=True)], dim=1)  # max first
    z = F.conv2d(pooled, sd["SpatialGate.spatial.conv.weight"], padding=3)
    mean, var = sd["SpatialGate.spatial.bn.running_mean"], sd["SpatialGate.spatial.bn.running_var"]
    if training:
        batch_mean = z.mean((0, 2, 3))
        batch_var = z.var((0, 2, 3), unbiased=False)
        unbiased = z.var((0, 2, 3), unbiased=True)
        new_mean = (1 - OFFICIAL_MOMENTUM) * mean + OFFICIAL_MOMENTUM * batch_mean
        new_var = (1 - OFFICIAL_MOMENTUM) * var + OFFICIAL_MOMENTUM * unbiased
        mean, var = batch_mean, batch_var
    else:
        new_mean, new_var = mean, var
    view = (1, -1, 1, 1)
    z = (z - mean.view(view)) / torch.sqrt(var.view(view) + OFFICIAL_EPS)
    z = z * sd["SpatialGate.spatial.bn.weight"].view(view) + sd["SpatialGate.spatial.bn.bias"].view(view)
    return x * torch.sigmoid(z), new_mean, new_var


OFFICIAL_POOLS = [pytest.param(("avg", "max"), id="avg-max"), pytest.param(("avg", "max", "lp", "lse"), id="all")]
OFFICIAL_SIZES = [pytest.param(32, 16, id="C32-r16"), pytest.param(24, 8, id="C24-r8")]


def _official_pair(channels, reduction, pool_types):
    """A random official dict and our float64 ``CBAM`` loaded (strictly) from its conversion."""
    gen = torch.Generator().manual_seed(SEED)
    sd = _official_state_dict(channels, reduction, gen)
    ours = CBAM(channels, reduction, preset="official", pool_types=pool_types, dtype=torch.float64)
    ours.load_state_dict(from_official(sd), strict=True)
    x = torch.randn(4, channels, 5, 6, generator=gen, dtype=torch.float64)
    return sd, ours, x, gen


@pytest.mark.parametrize(("channels", "reduction"), OFFICIAL_SIZES)
@pytest.mark.parametrize("pool_types", OFFICIAL_POOLS)
def test_official_eval_outputs_and_gradients_match(channels, reduction, pool_types):
    """Eval mode (running stats): our output and input gradient equal the official math's."""
    sd, ours, x, gen = _official_pair(channels, reduction, pool_types)
    ours.eval()
    upstream = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, _, _ = official_cbam(sd, x_ref, pool_types, training=False)
    got = ours(x_ours)
    expected.backward(upstream)
    got.backward(upstream)

    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("channels", "reduction"), OFFICIAL_SIZES)
@pytest.mark.parametrize("pool_types", OFFICIAL_POOLS)
def test_official_train_outputs_and_running_stats_match(channels, reduction, pool_types):
    """Train mode: batch-statistics output, and running stats updated with momentum 0.01."""
    sd, ours, x, _ = _official_pair(channels, reduction, pool_types)
    ours.train()
    expected, new_mean, new_var = official_cbam(sd, x, pool_types, training=True)

    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-10)
    bn = ours.spatial_att.bn
    torch.testing.assert_close(bn.running_mean, new_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, new_var, rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == int(sd["SpatialGate.spatial.bn.num_batches_tracked"]) + 1


def test_official_without_num_batches_tracked_loads_strictly():
    """Old official checkpoints lack ``num_batches_tracked``; they still load strictly and compute right."""
    gen = torch.Generator().manual_seed(SEED)
    sd = _official_state_dict(32, 16, gen)
    del sd["SpatialGate.spatial.bn.num_batches_tracked"]
    converted = from_official(sd)
    assert not any(key.endswith("num_batches_tracked") for key in converted)

    ours = CBAM(32, preset="official", dtype=torch.float64)
    ours.load_state_dict(converted, strict=True)
    ours.eval()
    x = torch.randn(2, 32, 5, 6, generator=gen, dtype=torch.float64)
    expected, _, _ = official_cbam(sd, x, ("avg", "max"), training=False)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-10)


def test_official_conversion_leaves_input_alone():
    """``from_official`` (which flips the spatial conv's input channels) does not touch its input."""
    sd = _official_state_dict(32, 16, torch.Generator().manual_seed(SEED))
    snapshot = _snapshot(sd)
    converted = from_official(sd)
    _assert_unmodified(sd, snapshot)
    weight = sd["SpatialGate.spatial.conv.weight"]
    torch.testing.assert_close(converted["spatial_att.conv.weight"], weight[:, [1, 0]], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- whole models

CHANNELS = 16


def _net(attention, name: str) -> nn.Module:
    """A small ResNet-like parameter layout with ``attention()`` at ``layer1.0.<name>`` and ``layer2.1.<name>``."""

    def block(with_attention: bool) -> nn.Module:
        b = nn.Module()
        b.conv1 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
        b.bn1 = nn.BatchNorm2d(CHANNELS)
        if with_attention:
            setattr(b, name, attention())
        b.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)
        return b

    net = nn.Module()
    net.conv1 = nn.Conv2d(3, CHANNELS, 3)
    net.bn1 = nn.BatchNorm2d(CHANNELS)
    net.layer1 = nn.Sequential(block(True), block(False))
    net.layer2 = nn.Sequential(block(False), block(True))
    net.fc = nn.Linear(CHANNELS, 10)
    return net


WHOLE_MODELS = [
    pytest.param(from_timm, lambda: CbamModule(CHANNELS), lambda: CBAM(CHANNELS, preset="timm"), "se", id="timm"),
    pytest.param(
        from_official, lambda: _OfficialCBAM(CHANNELS), lambda: CBAM(CHANNELS, preset="official"), "cbam",
        id="official",
    ),
]


@pytest.mark.parametrize(("convert", "theirs", "ours", "name"), WHOLE_MODELS)
def test_whole_model_dict_converts_every_cbam_and_keeps_the_rest(convert, theirs, ours, name):
    """Every CBAM under its prefix is renamed in place; other keys and tensors pass through as they are."""
    source = _randomise(_net(theirs, name), torch.Generator().manual_seed(SEED)).state_dict()
    snapshot = _snapshot(source)
    target = _net(ours, name)
    cbam_prefixes = (f"layer1.0.{name}.", f"layer2.1.{name}.")

    converted = convert(source)
    _assert_unmodified(source, snapshot)
    assert list(converted) == list(target.state_dict())  # same order as a model built with our CBAM
    target.load_state_dict(converted, strict=True)
    for key, value in source.items():
        if not key.startswith(cbam_prefixes):
            assert converted[key] is value, key
    assert sum(key.startswith(cbam_prefixes) for key in converted) == 2 * len(ours().state_dict())


@pytest.mark.parametrize(("convert", "theirs", "ours", "name"), WHOLE_MODELS)
def test_whole_model_cbams_compute_as_the_source(convert, theirs, ours, name):
    """The CBAM found at each prefix, loaded via the whole-model dict, matches its single-module conversion."""
    source_net = _randomise(_net(theirs, name), torch.Generator().manual_seed(SEED))
    target = _net(ours, name)
    target.load_state_dict(convert(source_net.state_dict()), strict=True)
    for path in (f"layer1.0.{name}", f"layer2.1.{name}"):
        single = ours()
        single.load_state_dict(convert(source_net.get_submodule(path).state_dict()), strict=True)
        loaded = target.get_submodule(path).state_dict()
        for key, value in single.state_dict().items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("path", ["layer1.0.se", "layer2.1.se"])
def test_whole_timm_model_cbams_match_timm_outputs(path):
    """Each CBAM loaded from a whole timm model's dict gives timm's output for that block."""
    gen = torch.Generator().manual_seed(SEED)
    source_net = _randomise(_net(lambda: CbamModule(CHANNELS), "se"), gen).eval()
    target = _net(lambda: CBAM(CHANNELS, preset="timm"), "se").eval()
    target.load_state_dict(from_timm(source_net.state_dict()), strict=True)
    x = torch.randn(2, CHANNELS, 6, 7, generator=gen)
    torch.testing.assert_close(target.get_submodule(path)(x), source_net.get_submodule(path)(x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ pass-through

NO_CBAM = [
    pytest.param(OrderedDict(), id="empty"),
    pytest.param(_net(lambda: nn.Identity(), "se").state_dict(), id="plain-net"),
    pytest.param(  # CBAM-looking suffixes without the MLP weight that marks a CBAM
        OrderedDict([
            ("head.spatial.conv.conv.weight", torch.ones(1, 1, 3, 3)),
            ("head.spatial.conv.bn.weight", torch.ones(1)),
            ("head.SpatialGate.spatial.conv.weight", torch.ones(1, 1, 3, 3)),
            ("head.ChannelGate.mlp.3.weight", torch.ones(4, 2)),
            ("channel.fc2.weight", torch.ones(4, 2, 1, 1)),
        ]),
        id="suffixes-without-anchor",
    ),
]


@pytest.mark.parametrize("convert", [from_timm, from_official])
@pytest.mark.parametrize("state_dict", NO_CBAM)
def test_dict_without_cbam_passes_through(convert, state_dict):
    """No CBAM, nothing renamed: same keys, same order, the very same tensors."""
    converted = convert(state_dict)
    assert list(converted) == list(state_dict)
    assert all(converted[key] is value for key, value in state_dict.items())


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("convert", [from_timm, from_official])
@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        pytest.param([("channel.fc1.weight", torch.ones(1))], "list", id="list-of-pairs"),
        pytest.param(None, "NoneType", id="none"),
        pytest.param(CbamModule(16), "CbamModule", id="module-not-its-state-dict"),
    ],
)
def test_non_mapping_raises_type_error(convert, value, type_name):
    """A non-mapping is refused with a message naming what was expected and what came."""
    with pytest.raises(TypeError, match="state dict") as info:
        convert(value)
    assert type_name in str(info.value)
    assert convert.__name__ in str(info.value)


@pytest.mark.parametrize(("channels", "kernel"), [(32, 7), (40, 3)])
def test_timm_light_cbam_converts_to_light_cbam_and_back(channels, kernel):
    """timm's LightCbamModule (a spatial conv over one map) into ``LightCBAM(preset="timm")`` and back
    exactly; then the same outputs, input gradients and running statistics as timm's, eval and training."""
    gen = torch.Generator().manual_seed(SEED)
    theirs = _randomise(LightCbamModule(channels, spatial_kernel_size=kernel), gen).double()
    ours = LightCBAM(channels, kernel_size=kernel, preset="timm").double()
    ours.load_state_dict(from_timm(theirs.state_dict()), strict=True)
    back = to_timm(ours.state_dict())
    assert list(back) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)
    for training in (False, True):
        theirs.train(training)
        ours.train(training)
        x = torch.randn(3, channels, 9, 11, generator=gen, dtype=torch.float64)
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        expected, got = theirs(x_theirs), ours(x_ours)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        expected.backward(upstream)
        got.backward(upstream)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-10, atol=1e-10)
    for key, value in from_timm(theirs.state_dict()).items():  # running statistics moved alike
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_light_cbam_has_no_official_equivalent():
    """The official code has no light CBAM: its one-map conv is refused, naming why."""
    state = LightCBAM(32, preset="official").state_dict()
    with pytest.raises(ValueError, match=r"spatial_att.conv.weight should be a \(1, 2, k, k\) .* got shape "
                                         r"\(1, 1, 7, 7\); a light CBAM's conv over one map has no equivalent"):
        to_official(state)


@pytest.mark.parametrize("convert", [from_timm, to_timm])
def test_timm_spatial_conv_of_another_shape_is_refused(convert):
    key = "spatial.conv.conv.weight" if convert is from_timm else "spatial_att.conv.weight"
    state = (CbamModule if convert is from_timm else lambda c: CBAM(c, preset="timm"))(32).state_dict()
    state[key] = torch.ones(1, 3, 7, 7)
    with pytest.raises(ValueError, match=r"\(1, 2, k, k\) .* or \(1, 1, k, k\) .* got shape \(1, 3, 7, 7\)"):
        convert(state)


@pytest.mark.parametrize("convert", [from_timm, from_official, to_timm, to_official, detect, strip_wrappers])
def test_what_is_no_state_dict_is_refused_naming_the_key(convert):
    with pytest.raises(TypeError, match=r"str keys, got the key 0 \(int\)"):
        convert({0: torch.ones(1)})
    if convert is not detect:  # detect reads keys only
        with pytest.raises(TypeError, match=r"a state dict of tensors, got list under 'a.channel.fc1.weight'"):
            convert({"a.channel.fc1.weight": [[1.0]]})
