"""The tutorial's section-6 variants against float64 references built from ``naive.py``."""

from collections import OrderedDict
from functools import reduce

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cbam

import naive

F64 = torch.float64


def randomise(module, seed=0):
    """Random weights everywhere and random BN statistics, so no test passes by symmetry."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.7)
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    return module.eval()


def bn_eval(bn):
    return None if bn is None else (
        lambda z: naive.batch_norm_eval(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps))


def reference_logits(module, x):
    """Channel and spatial logits of a (Parallel)CBAM's children, from the naive formulas.

    A chain of size-keeping convs equals one conv with the chain's broadcast product as its kernel
    (zero padding commutes with the chain), so the naive full conv checks the light forms too.
    """
    ca, sa = module.channel_att, module.spatial_att
    kernel = reduce(torch.mul, sa.conv_weights())
    a_c = naive.channel_logits(x, ca.fc1.weight, ca.fc2.weight, ca.fc1.bias, ca.fc2.bias, ca.pool_types)
    return a_c, naive.spatial_logits(x, kernel, bn_eval(sa.bn), sa.pool)


@pytest.mark.parametrize("preset", [None, "official"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_spatial_channel_order(preset, dims):
    module = randomise(cbam.CBAM(8, 2, 3, preset=preset, order="spatial-channel", dims=dims, dtype=F64))
    x = torch.randn(2, 8, *[5, 4, 3][:dims], dtype=F64)
    ca, sa = module.channel_att, module.spatial_att
    y = x * naive.spatial_map(x, sa.conv.weight, bn_eval(sa.bn))
    want = y * naive.channel_map(y, ca.fc1.weight, ca.fc2.weight, ca.fc1.bias, ca.fc2.bias, ca.pool_types)
    torch.testing.assert_close(module(x), want)
    maps = module.attention(x)
    torch.testing.assert_close(module(x), x * maps.spatial * maps.channel)


@pytest.mark.parametrize("combine", ["average", "logits"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_parallel_cbam(combine, dims):
    module = randomise(cbam.ParallelCBAM(8, 2, 3, combine=combine, preset="timm", dims=dims, dtype=F64))
    x = torch.randn(2, 8, *[5, 4, 3][:dims], dtype=F64)
    a_c, a_s = reference_logits(module, x)
    sigmoid = naive.GATES["sigmoid"]
    want = (x * sigmoid(a_c) + x * sigmoid(a_s)) / 2 if combine == "average" else x * sigmoid(a_c + a_s)
    torch.testing.assert_close(module(x), want)
    maps = module.attention(x)
    torch.testing.assert_close(maps.channel, sigmoid(a_c))
    torch.testing.assert_close(maps.spatial, sigmoid(a_s))


@pytest.mark.parametrize(
    ("conv", "dims", "weights"),
    [("factorized", 2, lambda k: 3 * k), ("factorized", 3, lambda k: 4 * k),
     ("separable", 1, lambda k: k + 2), ("separable", 2, lambda k: k * k + 2), ("separable", 3, lambda k: k**3 + 2)],
)
def test_light_spatial_convs(conv, dims, weights):
    """Outputs match the naive full conv with the product kernel; fewer weights than 2 k^d."""
    k = 5
    module = randomise(cbam.CBAM(8, 2, k, spatial_conv=conv, preset="official", dims=dims, dtype=F64))
    x = torch.randn(2, 8, *[6, 5, 4][:dims], dtype=F64)
    a_c, _ = reference_logits(module, x)
    y = x * naive.GATES["sigmoid"](a_c)
    _, a_s = reference_logits(module, y)
    torch.testing.assert_close(module(x), y * naive.GATES["sigmoid"](a_s))
    count = sum(w.numel() for w in module.spatial_att.conv_weights())
    assert count == weights(k) < 2 * k**dims


@pytest.mark.parametrize(("conv", "weights_per_position"), [("full", 2 * 49), ("factorized", 3 * 7),
                                                           ("separable", 2 + 49)])
def test_light_convs_count_fewer_flops(conv, weights_per_position):
    """torch's flop counter: one multiply-add (2 FLOPs) per weight per output position."""
    module = cbam.SpatialAttention(7, conv=conv)
    x = torch.randn(2, 16, 20, 24)
    with FlopCounterMode(display=False) as counter:
        module(x)
    assert counter.get_total_flops() == 2 * weights_per_position * 2 * 20 * 24


@pytest.mark.parametrize("conv", ["full", "factorized", "separable"])
@pytest.mark.parametrize("dims", [2, 3])
def test_light_cbam(conv, dims):
    """One pooled descriptor per gate: (avg + max) / 2 into the MLP once, one map into the conv."""
    module = randomise(cbam.LightCBAM(8, 2, 3, spatial_conv=conv, preset="timm", dims=dims, dtype=F64))
    assert module.channel_att.pool_types == ("mix",) and module.spatial_att.conv_weights()[0].shape[1] == 1
    x = torch.randn(2, 8, *[6, 5, 4][:dims], dtype=F64)
    a_c, _ = reference_logits(module, x)
    y = x * naive.GATES["sigmoid"](a_c)
    _, a_s = reference_logits(module, y)
    torch.testing.assert_close(module(x), y * naive.GATES["sigmoid"](a_s))


def test_light_cbam_matches_timm():
    timm_cbam = pytest.importorskip("timm.layers.cbam")
    theirs = randomise(timm_cbam.LightCbamModule(32, spatial_kernel_size=5))
    ours = cbam.LightCBAM(32, kernel_size=5, preset="timm").eval()
    with torch.no_grad():
        ours.channel_att.fc1.weight.copy_(theirs.channel.fc1.weight.flatten(1))
        ours.channel_att.fc2.weight.copy_(theirs.channel.fc2.weight.flatten(1))
        ours.spatial_att.conv.weight.copy_(theirs.spatial.conv.conv.weight)
        ours.spatial_att.bn.load_state_dict(theirs.spatial.conv.bn.state_dict())
    x = torch.randn(2, 32, 9, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_factorized_needs_two_dims():
    with pytest.raises(ValueError, match="factorized.*dims >= 2.*got dims=1"):
        cbam.CBAM(8, spatial_conv="factorized", dims=1)


@pytest.mark.parametrize(("build", "words"), [
    (lambda: cbam.CBAM(8, order="parallel"), ["order", "'spatial-channel'", "'parallel'"]),
    (lambda: cbam.ParallelCBAM(8, combine="max"), ["combine", "'logits'", "'max'"]),
    (lambda: cbam.SpatialAttention(conv="dilated"), ["conv", "'separable'", "'dilated'"]),
    (lambda: cbam.SpatialAttention(pool="max"), ["pool", "'concat'", "'mix'", "'max'"]),
    (lambda: cbam.DynamicCBAM(8, kernel_sizes=(3, 4)), ["kernel_size", "odd", "got 4"]),
    (lambda: cbam.DynamicCBAM(8, kernel_sizes=()), ["kernel_sizes", "non-empty", "()"]),
    (lambda: cbam.DynamicCBAM(8, reduction_ratios=(8, 8)), ["reduction_ratios", "distinct", "(8, 8)"]),
    (lambda: cbam.DynamicCBAM(8, temperature=0), ["temperature", "positive", "0"]),
    (lambda: cbam.CrossLayerCBAM([]), ["in_channels_list", "non-empty", "[]"]),
    (lambda: cbam.CrossLayerCBAM([16, 0]), ["in_channels_list[1]", ">= 1", "got 0"]),
])
def test_bad_variant_arguments(build, words):
    with pytest.raises((TypeError, ValueError)) as caught:
        build()
    for word in words:
        assert word in str(caught.value)


def test_cross_layer_cbam_on_lists_and_fpn_outputs():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = cbam.CrossLayerCBAM([8, 16, 32], reduction_ratio=4).eval()
    features = [torch.randn(2, c, s, s) for c, s in ((8, 16), (16, 8), (32, 4))]
    outs = module(features)
    assert isinstance(outs, list)
    for out, feature, level in zip(outs, features, module.cbams):
        torch.testing.assert_close(out, level(feature))

    fpn = torchvision.ops.FeaturePyramidNetwork([8, 16, 32], out_channels=12)
    pyramid = fpn(OrderedDict(zip(["p2", "p3", "p4"], features)))
    on_fpn = cbam.CrossLayerCBAM([12, 12, 12], reduction_ratio=4)
    refined = on_fpn(pyramid)
    assert isinstance(refined, OrderedDict) and list(refined) == ["p2", "p3", "p4"]
    for name, level in zip(refined, on_fpn.cbams):
        torch.testing.assert_close(refined[name], level(pyramid[name]))
    maps = on_fpn.attention(pyramid)
    assert maps["p3"].spatial.shape == (2, 1, 8, 8)


def test_cross_layer_cbam_checks_levels():
    module = cbam.CrossLayerCBAM([8, 16])
    with pytest.raises(ValueError, match="expects 2 feature levels, got 3"):
        module([torch.randn(1, 8, 4, 4)] * 3)
    with pytest.raises(ValueError, match="level 'b'.*16 channels.*got 8"):
        module(OrderedDict(a=torch.randn(1, 8, 4, 4), b=torch.randn(1, 8, 4, 4)))
    with pytest.raises(TypeError, match="list or a dict.*Tensor"):
        module(torch.randn(1, 8, 4, 4))


def dynamic(dims=2, **options):
    return randomise(cbam.DynamicCBAM(16, (1, 3, 5), (2, 4, 8), dims=dims, dtype=F64, **options))


@pytest.mark.parametrize("preset", [None, "official"])
def test_dynamic_cbam_is_the_mixture_of_its_candidates(preset):
    """Channel logits = sum_j p_j * (logits of the width-h_j sub-MLP); spatial = sum_i p_i * conv_i:
    both by linearity, computed candidate by candidate with the naive formulas."""
    module = dynamic(preset=preset)
    x = torch.randn(2, 16, 7, 6, dtype=F64)
    p_width, p_kernel = module.width_probabilities(), module.kernel_probabilities()
    a_c = sum(p * naive.channel_logits(x, module.fc1.weight[:h], module.fc2.weight[:, :h],
                                       None if module.fc1.bias is None else module.fc1.bias[:h], module.fc2.bias)
              for p, h in zip(p_width, module.hidden_widths))
    y = x * naive.GATES["sigmoid"](a_c)
    a_s = sum(p * naive.spatial_logits(y, w, bn_eval(module.bn)) for p, w in zip(p_kernel, module.kernels))
    torch.testing.assert_close(module(x), y * naive.GATES["sigmoid"](a_s))
    assert module.hidden_widths == (8, 4, 2)


@pytest.mark.parametrize(("kernel", "ratio"), [(0, 0), (2, 1), (1, 2)])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_finalize_keeps_the_output_at_a_one_hot_choice(kernel, ratio, dims):
    module = dynamic(dims=dims, preset="official")
    with torch.no_grad():
        module.kernel_logits.copy_(torch.nn.functional.one_hot(torch.tensor(kernel), 3) * 1e4)
        module.reduction_logits.copy_(torch.nn.functional.one_hot(torch.tensor(ratio), 3) * 1e4)
    final = module.finalize()
    assert type(final) is cbam.CBAM and not final.training
    assert final.spatial_att.kernel_size == (1, 3, 5)[kernel]
    assert final.channel_att.reduction_ratio == (2, 4, 8)[ratio]
    assert final.channel_att.hidden_channels == (8, 4, 2)[ratio]
    x = torch.randn(2, 16, *[6, 5, 4][:dims], dtype=F64)
    torch.testing.assert_close(final(x), module(x), rtol=1e-12, atol=1e-12)


def test_a_bfloat16_dynamic_cbam_runs_under_float16_autocast():
    """Its mixed kernel was a ``stack`` of the bfloat16 candidates, which CPU float16 autocast refuses (it
    promotes only float32 and its own dtype). Close to the same weights and input in float64."""
    module = dynamic().bfloat16()
    x = torch.randn(2, 16, 7, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.float16):
        got = module(x)
    want = module.double()(x.double())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-2


def test_dynamic_cbam_learns_its_choices():
    """Unlike the tutorial's (whose 'parameters' get no gradient), both logit vectors move."""
    torch.manual_seed(0)
    attention = cbam.DynamicCBAM(16)
    head = torch.nn.Linear(16, 3)
    x, labels = torch.randn(8, 16, 10, 10), torch.randint(0, 3, (8,))
    arch = torch.optim.Adam(attention.arch_parameters(), lr=0.1)
    weights = torch.optim.SGD([*attention.weight_parameters(), *head.parameters()], lr=0.1)
    before = [p.detach().clone() for p in attention.arch_parameters()]
    loss = torch.nn.functional.cross_entropy(head(attention(x).mean((2, 3))), labels)
    loss.backward()
    arch.step()
    weights.step()
    for old, new in zip(before, attention.arch_parameters()):
        assert not torch.equal(old, new)
    assert len(list(attention.weight_parameters())) == len(list(attention.parameters())) - 2


def test_temperature_sharpens_the_choice():
    sharp, soft = cbam.DynamicCBAM(16, temperature=0.1), cbam.DynamicCBAM(16, temperature=10.0)
    for module in (sharp, soft):
        with torch.no_grad():
            module.kernel_logits.copy_(torch.tensor([0.0, 0.5, 1.0]))
    assert sharp.kernel_probabilities().max() > 0.99 > 0.4 > soft.kernel_probabilities().max()


@pytest.mark.parametrize("build", [
    lambda: cbam.ParallelCBAM(4, 2, 3, combine="logits", preset="official", dtype=F64),
    lambda: cbam.CBAM(4, 2, 3, spatial_conv="factorized", order="spatial-channel", dtype=F64),
    lambda: cbam.CBAM(4, 2, 3, spatial_conv="separable", dims=1, impl="reference", dtype=F64),
    lambda: cbam.DynamicCBAM(4, (1, 3), (2, 4), preset="timm", dtype=F64),
    lambda: cbam.LightCBAM(4, 2, 3, spatial_conv="separable", impl="reference", dtype=F64),
])
def test_variants_gradcheck(build):
    module = randomise(build())
    names = [name for name, _ in module.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    x = torch.randn(2, 4, *([5, 4][: module_dims(module)]), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *module.parameters()))
    assert torch.autograd.gradgradcheck(f, (x, *module.parameters()), fast_mode=True)


def module_dims(module):
    return module.dims if isinstance(module, cbam.DynamicCBAM) else module.channel_att.dims


@pytest.mark.parametrize("build", [
    lambda impl: cbam.CBAM(8, 2, 5, spatial_conv="factorized", preset="official", impl=impl, dtype=F64),
    lambda impl: cbam.CBAM(8, 2, 5, spatial_conv="separable", dims=3, impl=impl, dtype=F64),
    lambda impl: cbam.LightCBAM(8, 2, 5, preset="timm", impl=impl, dtype=F64),
    lambda impl: cbam.CBAM(8, 2, 5, gate="hard-sigmoid", pool_types=("lse", "mix"), impl=impl, dtype=F64),
])
def test_fused_variants_match_the_reference(build):
    """Outputs, input and parameter gradients of impl="fused" equal the reference's, in train mode."""
    fused, reference = build("fused").train(), build("reference").train()
    reference.load_state_dict(randomise(fused).train().state_dict())
    dims = fused.channel_att.dims
    x = torch.randn(3, 8, *[6, 5, 4][:dims], dtype=F64, requires_grad=True)
    upstream = torch.randn(x.shape, dtype=F64)
    results = []
    for module in (fused, reference):
        out = module(x)
        results.append([out, *torch.autograd.grad(out, [x, *module.parameters()], upstream)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    if fused.spatial_att.bn is not None:
        torch.testing.assert_close(fused.spatial_att.bn.running_var, reference.spatial_att.bn.running_var)
