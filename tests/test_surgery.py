"""add_cbam: placement, widths, untouched weights and keys, checkpoints, errors, identity start; remove_cbam."""

import copy
import io
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import cbam
from cbam.models import resnet18 as cbam_resnet18
from cbam.models.surgery import IDENTITY_GATE, add_cbam, remove_cbam

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def tv(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def cbams(model):
    return [m for m in model.modules() if isinstance(m, cbam.CBAM)]


def block_widths(model, block_types):
    """Output channels of every residual block, measured by running the model (on one small image: CPU time)."""
    widths, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, block_types):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: widths.__setitem__(n, o.shape[1])))
    with torch.no_grad():
        model.eval()(X[:1, :, :32, :32])
    for handle in handles:
        handle.remove()
    return widths


def trained_like(seed=0):
    """A resnet18 whose BatchNorms look trained: random affine, running statistics of its own activations."""
    model = tv("resnet18", seed, num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.momentum = None  # cumulative average: the statistics of the calibration batch
        model.train()(torch.randn(16, 3, 64, 64))
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


TV_BLOCKS = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)


@pytest.mark.parametrize("name, count", [("resnet18", 8), ("resnet50", 16), ("resnext50_32x4d", 16),
                                         ("wide_resnet50_2", 16)])
def test_torchvision_count_and_widths(name, count):
    model = tv(name)
    assert add_cbam(model) is model
    assert len(cbams(model)) == count
    widths = block_widths(model, TV_BLOCKS)
    assert len(widths) == count
    for block_name, width in widths.items():
        assert model.get_submodule(block_name).cbam.channel_att.in_channels == width


def reference_block(block, x):
    """A torchvision block with CBAM on the residual branch, written out without hooks (``.forward``)."""
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        out = F.relu(block.bn1.forward(block.conv1(x)))
        out = F.relu(block.bn2.forward(block.conv2(out)))
        out = block.bn3.forward(block.conv3(out))
    else:
        out = F.relu(block.bn1.forward(block.conv1(x)))
        out = block.bn2.forward(block.conv2(out))
    shortcut = x if block.downsample is None else block.downsample(x)
    return F.relu(block.cbam(out) + shortcut)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_cbam_sits_after_last_bn_before_addition(name):
    model = add_cbam(tv(name)).eval()
    x = torch.randn(2, 64, 16, 16)
    for block in (model.layer1[0], model.layer2[0]):  # without and with a downsample shortcut
        with torch.no_grad():
            torch.testing.assert_close(block(x), reference_block(block, x))
            x = block(x)


def test_weights_untouched_and_only_attention_keys_added():
    model = tv("resnet50")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_cbam(model)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    attention_keys = {f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, cbam.CBAM)
                      for key in m.state_dict()}
    assert set(after) - set(before) == attention_keys
    assert all(".cbam." in key for key in attention_keys) and len(attention_keys) == 16 * 3


def test_checkpoint_saved_before_surgery_loads_by_name():
    buffer = io.BytesIO()
    torch.save(tv("resnet18", seed=1).state_dict(), buffer)  # a "pretrained" checkpoint
    model = add_cbam(tv("resnet18", seed=2))
    attention_keys = set(model.state_dict()) - set(tv("resnet18").state_dict())
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    result = model.load_state_dict(checkpoint, strict=False)
    assert set(result.missing_keys) == attention_keys and result.unexpected_keys == []
    for key, value in checkpoint.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_torchvision_with_cbam_equals_cbam_models_resnet():
    """tv resnet18 + add_cbam and cbam.models.resnet18(attention="cbam") share keys and compute the same."""
    model = add_cbam(tv("resnet18", num_classes=10)).eval()
    ours = cbam_resnet18(num_classes=10).eval()
    ours.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(X), model(X))


def test_cbam_models_blocks_use_their_slot():
    model = add_cbam(cbam_resnet18(attention=None))
    assert len(cbams(model)) == 8
    assert set(model.state_dict()) == set(cbam_resnet18().state_dict())


def test_second_call_is_an_error_and_changes_nothing():
    model = add_cbam(tv("resnet18"))
    keys = list(model.state_dict())
    for attention_name in ("cbam", "other"):
        with pytest.raises(ValueError, match="already has CBAM after bn2 from an earlier call"):
            add_cbam(model, attention_name=attention_name)
    assert list(model.state_dict()) == keys
    assert len(model.layer1[0].bn2._forward_hooks) == 1


def test_a_failing_call_leaves_the_model_as_it_was():
    """Every check runs before the first change: a conflict in the last block stops them all."""
    model = tv("resnet18")
    model.layer4[1].cbam = nn.Identity()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"layer4\.1\.cbam already holds Identity.*another attention_name"):
        add_cbam(model)
    assert list(model.state_dict()) == keys and cbams(model) == []
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="reduction_ratio"):
        add_cbam(tv("resnet18"), reduction_ratio=0)


@pytest.mark.parametrize("name, count", [("resnet18", 8), ("resnet50", 16)])
def test_timm_resnet_uses_the_se_slot(name, count):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_cbam(model)
    assert len(cbams(model)) == count
    assert all(isinstance(block.se, cbam.CBAM) for stage in (model.layer1, model.layer4) for block in stage)
    new_keys = set(model.state_dict()) - set(before)
    assert new_keys and all(".se." in key for key in new_keys)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    widths = block_widths(model, (timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck))
    assert all(model.get_submodule(n).se.channel_att.in_channels == w for n, w in widths.items())
    # The slot sees the last BN's output: capture both and compare.
    block, seen = model.layer2[0], {}
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    last_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
    block.se.register_forward_pre_hook(lambda m, i: seen.__setitem__("se", i[0].clone()))
    with torch.no_grad():
        model(X)
    torch.testing.assert_close(seen["se"], seen["bn"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"layer1\.0\.se already holds CBAM"):
        add_cbam(model)


def test_timm_block_with_other_attention_is_refused():
    model = timm.create_model("seresnet18", pretrained=False)
    with pytest.raises(ValueError, match=r"layer1\.0\.se already holds SEModule"):
        add_cbam(model)
    assert cbams(model) == []


class Branch(nn.Module):
    def __init__(self, channels, norm):
        super().__init__()
        self.out_channels = channels
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = norm

    def forward(self, x):
        return self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))


class Block(nn.Module):
    def __init__(self, channels, norm):
        super().__init__()
        self.branch = Branch(channels, norm)

    def forward(self, x):
        return F.relu(x + self.branch(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(Block(16, nn.GroupNorm(4, 16)), Block(16, nn.BatchNorm2d(16)))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("selector, channels", [
    (Branch, None),                                           # type; width from the last norm (GroupNorm first)
    (lambda name, module: name.endswith(".branch"), None),    # name predicate
    (Branch, lambda module: module.out_channels),             # width from a callable
    ((nn.LSTM, Branch), 16),                                  # a tuple of types; a fixed width
])
def test_custom_model_with_selector(selector, channels):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_cbam(model, selector=selector, channels=channels, reduction_ratio=4)
    assert [type(b.cbam) for b in model.blocks] == [cbam.CBAM, cbam.CBAM]
    assert all(b.cbam.channel_att.in_channels == 16 and b.cbam.channel_att.hidden_channels == 4 for b in model.blocks)
    assert set(model.state_dict()) - set(before) == {k for k in model.state_dict() if ".cbam." in k}
    block = model.blocks[0].eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(x + block.cbam(block.branch.forward(x))))


def test_selector_errors():
    with pytest.raises(ValueError, match=r"blocks\.0 is an item of an nn\.Sequential.*inside blocks\.0"):
        add_cbam(Net(), selector=Block)
    with pytest.raises(ValueError, match=r"cannot infer the channel count of stem \(Conv2d\).*channels="):
        add_cbam(Net(), selector=lambda name, module: name == "stem")
    with pytest.raises(ValueError, match="matched the model itself"):
        add_cbam(Net(), selector=Net)
    with pytest.raises(ValueError, match="matched no module of Net"):
        add_cbam(Net(), selector=nn.LSTM)
    with pytest.raises(ValueError, match=r"branch\.norm1 and blocks\.0\.branch\.norm2 would both"):
        add_cbam(Net(), selector=lambda name, module: name.startswith("blocks.0.branch.norm"))
    with pytest.raises(TypeError, match=r"channels\('blocks\.0\.branch'\) must be an int"):
        add_cbam(Net(), selector=Branch, channels=lambda module: 16.0)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"selector": "layer1"}, TypeError, "selector must be None, an nn.Module subclass"),
    ({"selector": ()}, TypeError, "selector must be"),
    ({"selector": (Branch, "x")}, TypeError, "selector must be"),
    ({"channels": 64}, ValueError, "channels= goes with selector="),
    ({"selector": Branch, "channels": 0}, ValueError, "channels must be an int >= 1, got 0"),
    ({"selector": Branch, "channels": "64"}, TypeError, "channels must be an int"),
    ({"attention_name": 3}, TypeError, "attention_name must be a str"),
    ({"attention_name": "my.cbam"}, ValueError, "attention_name must be a valid attribute name"),
    ({"init": "zeros"}, ValueError, "init must be one of 'default', 'identity'; got 'zeros'"),
    ({"init": 1}, TypeError, "init must be 'default', 'identity' or a float"),
    ({"init": 1.0}, ValueError, r"must lie in \(0, 1\), got 1.0"),
    ({"init": "identity", "mlp_bias": False}, ValueError, "needs mlp_bias=True and spatial_norm=True"),
    ({"kernel_size": 4}, ValueError, "kernel_size must be a positive odd int"),
])
def test_bad_arguments(kwargs, error, match):
    model = tv("resnet18")
    with pytest.raises(error, match=match):
        add_cbam(model, **kwargs)
    assert cbams(model) == []


def test_bad_models():
    with pytest.raises(TypeError, match="add_cbam expects an nn.Module, got dict"):
        add_cbam({})
    with pytest.raises(ValueError, match="found no residual block it knows in Sequential.*selector="):
        add_cbam(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))


def test_forward_backward_reaches_every_cbam():
    model = add_cbam(tv("resnet18", num_classes=10)).train()
    F.cross_entropy(model(X), torch.tensor([1, 2])).backward()
    for module in cbams(model):
        for name, parameter in module.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_options_reach_the_modules_and_follow_the_model():
    model = add_cbam(tv("resnet18").double().eval(), preset="timm", reduction_ratio=8)
    for module in cbams(model):
        assert module.channel_att.fc1.weight.dtype == torch.float64 and not module.training
        assert module.spatial_att.bn is not None  # the timm preset's spatial BatchNorm
    assert model.layer1[0].cbam.channel_att.hidden_channels == 8
    assert model(X.double()).dtype == torch.float64


def test_survives_deepcopy_pickling_and_trace():
    model = add_cbam(tv("resnet18", num_classes=10)).eval()
    with torch.no_grad():
        want = model(X)
        clone = copy.deepcopy(model)
        (hook,) = clone.layer1[0].bn2._forward_hooks.values()
        assert hook.attention is clone.layer1[0].cbam  # the copy's hook drives the copy's module
        torch.testing.assert_close(clone(X), want)
        clone.layer1[0].cbam.spatial_att.conv.weight.zero_()  # changes the copy only
        assert not torch.allclose(clone(X), want) and torch.equal(model(X), want)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(X), want)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the CBAM's input checks see traced shapes
            traced = torch.jit.trace(model, X)
        torch.testing.assert_close(traced(X), want)
        torch.testing.assert_close(traced(X.flip(0)), model(X.flip(0)))
    torch.testing.assert_close(torch.export.export(model, (X,)).module()(X), want)


def test_a_replica_sharing_the_hooks_is_refused():
    """``nn.DataParallel`` copies each module with ``_replicate_for_data_parallel``, which shares the hook
    dicts: a replica's hook would run the original CBAM (on the first GPU's weights)."""
    model = add_cbam(tv("resnet18", num_classes=10)).eval()
    original = model.layer1[0].bn2
    replica = original._replicate_for_data_parallel()
    replica._parameters.update(original._parameters)  # replicate() gives it broadcast copies of them
    with pytest.raises(RuntimeError, match="shares the original's hooks .*use DistributedDataParallel"):
        replica(torch.randn(2, 64, 8, 8))


@pytest.mark.parametrize("gate", ["sigmoid", "hard-sigmoid"])
def test_identity_start_is_exactly_a_constant_scale(gate):
    model = add_cbam(tv("resnet18"), init="identity", gate=gate, pool_types=("avg", "max", "lse"))
    module = model.layer2[1].cbam
    x = torch.randn(2, 128, 8, 8)
    for train in (True, False):
        torch.testing.assert_close(module.train(train)(x), IDENTITY_GATE ** 2 * x)
    start = add_cbam(tv("resnet18"), init=0.9).layer1[0].cbam.eval()
    torch.testing.assert_close(start(torch.ones(1, 64, 4, 4)), torch.full((1, 64, 4, 4), 0.81))


def test_identity_start_barely_moves_a_trained_model_but_default_does():
    def relative_change(init):
        model = trained_like()
        with torch.no_grad():
            before = model(X)
            after = add_cbam(model, init=init)(X)
        return ((after - before).norm() / before.norm()).item()

    assert relative_change("identity") < 0.05
    assert relative_change("default") > 0.3


def test_identity_start_still_learns():
    """The zeroed W2 and spatial BN weight get gradients at once; W1 and the conv after one step."""
    model = add_cbam(trained_like().train(), init="identity")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for step in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(X), torch.tensor([1, 2])).backward()
        for module in cbams(model):
            learning = [module.channel_att.fc2.weight, module.spatial_att.bn.weight, module.channel_att.fc2.bias]
            if step == 1:
                learning += [module.channel_att.fc1.weight, module.spatial_att.conv.weight]
            assert all(p.grad.abs().sum() > 0 for p in learning)
        optimizer.step()



STAGE_BLOCKS = [f"layer{stage}.{index}" for stage in (1, 2, 3, 4) for index in (0, 1)]


def no_cbam_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def test_remove_cbam_is_exported_next_to_add_cbam():
    assert cbam.remove_cbam is remove_cbam and cbam.models.remove_cbam is remove_cbam
    assert "remove_cbam" in cbam.__all__ and "remove_cbam" in cbam.models.__all__


def test_remove_restores_torchvision_model_scripts_and_adds_again():
    model = tv("resnet18", num_classes=10).eval()
    original, keys = copy.deepcopy(model), list(model.state_dict())
    with torch.no_grad():
        want = original(X)
        assert not torch.equal(add_cbam(model)(X), want)
        assert remove_cbam(model) == [f"{block}.cbam" for block in STAGE_BLOCKS]
        assert torch.equal(model(X), want)
    assert list(model.state_dict()) == keys and cbams(model) == [] and no_cbam_hooks(model)
    assert not any(hasattr(model.get_submodule(block), "cbam") for block in STAGE_BLOCKS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.equal(scripted(X), want)
    assert len(cbams(add_cbam(model))) == 8  # and again
    assert len(remove_cbam(model)) == 8 and list(model.state_dict()) == keys


def test_remove_restores_timm_se_slot():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    original, keys = copy.deepcopy(model), list(model.state_dict())
    add_cbam(model)
    assert remove_cbam(model) == [f"{block}.se" for block in STAGE_BLOCKS]
    assert all(model.get_submodule(block).se is None for block in STAGE_BLOCKS)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(X), original(X))


def test_remove_keeps_other_attention_in_a_slot():
    model = timm.create_model("seresnet18", pretrained=False)
    with pytest.raises(ValueError, match="remove_cbam found no CBAM in ResNet"):
        remove_cbam(model)
    assert type(model.layer1[0].se).__name__ == "SEModule"


def test_remove_from_selected_modules_and_attention_name():
    model = Net().eval()
    original, keys = copy.deepcopy(model), list(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    add_cbam(model, selector=Branch)
    assert remove_cbam(model) == ["blocks.0.cbam", "blocks.1.cbam"]
    assert list(model.state_dict()) == keys and no_cbam_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    add_cbam(model, selector=Branch, attention_name="att")
    with pytest.raises(ValueError, match=r"<parent>\.cbam \(2 add_cbam hooks keep theirs under another attention_name"):
        remove_cbam(model)  # and changes nothing
    assert len(cbams(model)) == 2 and all(len(b.branch._forward_hooks) == 1 for b in model.blocks)
    assert remove_cbam(model, attention_name="att") == ["blocks.0.att", "blocks.1.att"]
    assert list(model.state_dict()) == keys and no_cbam_hooks(model)


def test_remove_built_in_cbam_gives_the_plain_cbam_resnet():
    torch.manual_seed(0)
    model = cbam_resnet18(num_classes=10).eval()
    assert remove_cbam(model) == [f"{block}.cbam" for block in STAGE_BLOCKS]
    assert all(model.get_submodule(block).cbam is None for block in STAGE_BLOCKS)
    plain = cbam_resnet18(num_classes=10, attention=None).eval()
    plain.load_state_dict(model.state_dict())  # strict: the same keys
    with torch.no_grad():
        assert torch.equal(model(X), plain(X))


def test_a_selection_inside_a_block_with_its_own_slot_is_refused():
    """A selector on a cbam.models block's bn2 would store the CBAM in the block's ``cbam`` slot, which the block's
    forward applies, and hook bn2 too: the CBAM ran twice. Refused, the model unchanged; another name works."""
    model = cbam_resnet18(num_classes=10, attention=None).eval()
    original = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"layer1.0.bn2 is inside a BasicBlock whose forward applies its own 'cbam' "
                                         r"slot, where a CBAM stored beside layer1.0.bn2 would run twice"):
        add_cbam(model, selector=lambda name, module: name == "layer1.0.bn2")
    assert model.layer1[0].cbam is None and no_cbam_hooks(model)
    assert list(model.state_dict()) == list(original.state_dict())
    add_cbam(model, selector=lambda name, module: name == "layer1.0.bn2", attention_name="att")
    assert model.layer1[0].cbam is None and len(cbams(model)) == 1
    assert remove_cbam(model, attention_name="att") == ["layer1.0.att"]
    with torch.no_grad():
        assert torch.equal(model(X), original(X))


def test_remove_errors():
    with pytest.raises(TypeError, match="remove_cbam expects an nn.Module, got dict"):
        remove_cbam({})
    with pytest.raises(ValueError, match="attention_name must be a valid attribute name"):
        remove_cbam(add_cbam(tv("resnet18")), attention_name="a.b")
    for model in (tv("resnet18"), cbam_resnet18(attention=None), nn.Sequential(nn.Conv2d(3, 8, 3), cbam.CBAM(8))):
        with pytest.raises(ValueError, match=f"remove_cbam found no CBAM in {type(model).__name__} where add_cbam"):
            remove_cbam(model)
    assert len(cbams(model)) == 1  # a CBAM elsewhere stays


class Pair(nn.Module):
    def forward(self, x):
        return x, x


class PairBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = Pair()

    def forward(self, x):
        return self.pair(x)[0]


@pytest.mark.parametrize("make, selector, in_channels, match", [
    (Net, Branch, 3, r"CBAM on Branch's output has 8 channels but that output has shape \(2, 16, 8, 8\) \(16 chan"),
    (PairBlock, Pair, 16, r"CBAM on Pair's output has 8 channels but that output is a tuple"),
])
def test_wrong_channels_fails_at_forward_naming_the_module(make, selector, in_channels, match):
    model = add_cbam(make(), selector=selector, channels=8)
    with pytest.raises(ValueError, match=match + r".*pass add_cbam's channels="):
        model(torch.randn(2, in_channels, 8, 8))
