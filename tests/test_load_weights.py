"""``cbam.convert.load_weights``: checkpoints as the official code, timm and torchvision write them load
into our models (and ours into theirs) with the source's logits; bad files are refused in one line.

Sources are built in ``wild_checkpoints`` (the official math re-stated from its code, timm and
torchvision themselves); expectations are those models' own logits and key sets.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import sys
from collections import OrderedDict
from functools import partial

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

import cbam
from cbam.cli import main
from cbam.convert import load_weights, save_weights, strip_wrappers

from wild_checkpoints import NUM_CLASSES, Sources, assert_same_logits, logits, perturb, timm_resnet, torchvision_resnet

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return Sources.shared(tmp_path_factory)


def resnet50(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return cbam.models.resnet50(num_classes=NUM_CLASSES, **kwargs)


def attention_keys(model: nn.Module) -> list[str]:
    return [key for key in model.state_dict() if ".cbam." in key]


def test_official_pth_tar_loads_with_the_official_logits(sources):
    """train_imagenet.py's dict, DataParallel's ``module.`` prefix, [max, mean] spatial channels."""
    model = resnet50(preset="official")
    report = load_weights(sources.official_path, model)
    assert_same_logits(model, sources.official)
    assert (report.layout.name, report.entry, report.stripped, report.converted) == \
        ("official", "state_dict", ("module.",), "official -> cbam")
    assert report.loaded == len(model.state_dict()) and not report.left_at_init
    text = str(report)
    assert "official" in text and "ResNet-50" in text and "'module.'" in text and "loaded strictly" in text


def test_official_checkpoint_without_batch_counters(sources):
    """Checkpoints from PyTorch < 0.4.1 have no ``num_batches_tracked``: loaded, the counters listed as kept."""
    state = torch.load(sources.official_path, weights_only=True)["state_dict"]
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    model = resnet50(preset="official")
    report = load_weights(state, model)
    assert_same_logits(model, sources.official)
    norms = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
    assert sorted(report.counters) == sorted(f"{name}.num_batches_tracked" for name in norms)
    assert f"{len(norms)} BatchNorm batch counters absent" in str(report)


def test_timm_checkpoint_loads_its_model_or_its_ema(sources):
    """timm's train.py dict: ``state_dict`` (compiled: ``_orig_mod.``) first, ``state_dict_ema`` on request."""
    model = resnet50(preset="timm")
    report = load_weights(sources.timm_path, model)
    assert_same_logits(model, sources.timm)
    assert (report.layout.name, report.entry, report.other_entries, report.stripped) == \
        ("timm", "state_dict", ("state_dict_ema",), ("_orig_mod.",))
    assert "state_dict_ema" in str(report)
    report = load_weights(sources.timm_path, model, entry="state_dict_ema")
    assert_same_logits(model, sources.timm_ema)
    assert report.entry == "state_dict_ema" and report.stripped == ()


def test_torchvision_resnet_loads_strictly_into_a_plain_model(sources):
    model = resnet50(attention=None)
    report = load_weights(sources.torchvision_path, model)
    assert_same_logits(model, sources.torchvision)
    assert report.layout.name == report.target.name == "plain" and report.loaded == len(model.state_dict())
    assert "loaded strictly" in str(report)


def test_torchvision_backbone_into_a_cbam_model_leaves_exactly_the_attention_at_init(sources):
    model = resnet50()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    report = load_weights(sources.torchvision_path, model)
    expected_left = attention_keys(model)
    assert len(expected_left) == 16 * 3
    assert sorted(report.left_at_init) == sorted(expected_left)
    state, source = model.state_dict(), sources.torchvision.state_dict()
    for key in expected_left:
        assert torch.equal(state[key], before[key]), key
    for key, value in source.items():
        assert torch.equal(state[key], value), key
    assert "left at initialisation: 48 attention keys" in str(report) and "16 modules" in str(report)
    with pytest.raises(ValueError, match=r"48 missing and 0 unexpected keys \(first: missing 'layer1.0.cbam."):
        load_weights(sources.torchvision_path, model, allow_missing_attention=False)


def test_our_checkpoint_loads_into_timm_and_torchvision_hooks(sources, tmp_path):
    """The other way: our safetensors into timm's CBAM ResNet (converted to its keys on the way in)."""
    ours = resnet50(preset="timm")
    load_weights(sources.timm_path, ours)
    path = save_weights(tmp_path / "ours.safetensors", ours.state_dict())
    theirs = timm.create_model("resnet50", block_args={"attn_layer": "cbam"}, num_classes=NUM_CLASSES)
    report = load_weights(path, theirs)
    assert report.converted == "cbam -> timm"
    assert_same_logits(theirs, sources.timm)


def test_add_cbam_model_takes_official_weights(sources):
    """torchvision + ``add_cbam`` (hooked CBAMs beside bn3) holds the same keys as ``cbam.models``."""
    torch.manual_seed(0)
    model = cbam.add_cbam(torchvision.models.resnet50(num_classes=NUM_CLASSES), preset="official")
    load_weights(sources.official_path, model)
    assert_same_logits(model, sources.official)


def test_new_head_leaves_another_classifier_at_init():
    source = torchvision_resnet(18, num_classes=1000)
    torch.manual_seed(0)
    model = cbam.models.resnet18(num_classes=NUM_CLASSES)
    fc = model.fc.weight.clone()
    with pytest.raises(ValueError, match=r"size mismatch for fc.weight: found torch.Size\(\[1000, 512\]\) in the "
                                         r"checkpoint, expected torch.Size\(\[10, 512\]\)"):
        load_weights(source.state_dict(), model)
    report = load_weights(source.state_dict(), model, new_head=True)
    assert report.new_head == ("fc.weight", "fc.bias") and torch.equal(model.fc.weight, fc)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_new_head_is_the_classifier_not_a_cbam_registered_after_it():
    """``add_cbam`` on a model's top-level ``features`` puts the CBAM on the root, after ``classifier``: the head
    swapped is still the classifier (the CBAM's channel MLP was taken for it, and the load refused)."""
    source = torchvision.models.mobilenet_v2(num_classes=1000)
    torch.manual_seed(0)
    model = cbam.add_cbam(torchvision.models.mobilenet_v2(num_classes=NUM_CLASSES),
                          selector=lambda name, module: name == "features")
    assert [name for name, _ in model.named_children()][-2:] == ["classifier", "cbam"]
    head, mlp = model.classifier[1].weight.clone(), model.cbam.channel_att.fc1.weight.clone()
    report = load_weights(source.state_dict(), model, new_head=True)
    assert report.new_head == ("classifier.1.weight", "classifier.1.bias")
    assert torch.equal(model.classifier[1].weight, head) and torch.equal(model.cbam.channel_att.fc1.weight, mlp)
    assert torch.equal(model.features[18][0].weight, source.features[18][0].weight)


def test_two_cbams_under_one_parent_load_their_own_weights():
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), cbam.CBAM(8, 4), nn.Conv2d(8, 8, 3), cbam.CBAM(8, 4))

    torch.manual_seed(0)
    source, model = net(), net()
    load_weights(source.state_dict(), model)
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile], ids=["DataParallel", "compile"])
def test_a_wrapped_model_loads_plain_and_wrapped_checkpoints(wrap):
    torch.manual_seed(0)
    source = cbam.models.resnet18(num_classes=NUM_CLASSES)
    for checkpoint in (source.state_dict(), nn.DataParallel(source).state_dict()):
        model = wrap(cbam.models.resnet18(num_classes=NUM_CLASSES))
        report = load_weights(checkpoint, model)
        assert report.loaded == len(source.state_dict())
        inner = getattr(model, "module", getattr(model, "_orig_mod", None))
        assert all(torch.equal(value, source.state_dict()[key]) for key, value in inner.state_dict().items())


def test_new_head_on_a_wrapped_model():
    source = torchvision_resnet(18, num_classes=1000)
    model = nn.DataParallel(cbam.models.resnet18(num_classes=NUM_CLASSES))
    report = load_weights(source.state_dict(), model, new_head=True)
    assert report.new_head == ("fc.weight", "fc.bias")
    assert torch.equal(model.module.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_the_spatial_swap_is_reported_in_its_direction(sources):
    official = load_weights(sources.official.state_dict(), resnet50(preset="official"))
    assert "converted official -> cbam (spatial conv [max, mean] -> [mean, max])" in str(official)
    back = load_weights(resnet50(preset="official").state_dict(), copy.deepcopy(sources.official))
    assert "converted cbam -> official (spatial conv [mean, max] -> [max, mean])" in str(back)


def test_wrappers_are_stripped_in_any_combination():
    state = {"module._orig_mod.a.weight": torch.ones(1), "module._orig_mod.b._orig_mod.c": torch.zeros(1)}
    stripped = strip_wrappers(state)
    assert list(stripped.state) == ["a.weight", "b.c"] and stripped.removed == ("module.", "_orig_mod.")
    assert strip_wrappers({"module.a": torch.ones(1), "b": torch.ones(1)}).removed == ()


# ------------------------------------------------------------------- AveragedModel (SWA, EMA) and Lightning


def cbam_resnet18(seed: int) -> nn.Module:
    """A CBAM ResNet-18 with random BatchNorm statistics and attention weights (``seed``), in eval mode."""
    torch.manual_seed(seed)
    return perturb(cbam.models.resnet18(num_classes=NUM_CLASSES), seed, attention_only_params=".cbam.")


def averaged_resnet18() -> AveragedModel:
    """SWA in plain torch: an ``AveragedModel`` that averaged three differently trained copies of one model."""
    averaged = AveragedModel(cbam_resnet18(0))
    for seed in (1, 2, 3):
        averaged.update_parameters(cbam_resnet18(seed))
    return averaged.eval()


def lightning_checkpoint(model: nn.Module, attribute: str) -> dict:
    """What Lightning's ``Trainer.save_checkpoint`` writes for a LightningModule holding ``model`` as
    ``self.<attribute>``, in plain types (Lightning is not needed to read it, nor installed)."""
    return {"epoch": 4, "global_step": 500, "pytorch-lightning_version": "2.4.0",
            "state_dict": OrderedDict((f"{attribute}.{key}", value) for key, value in model.state_dict().items()),
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                  "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]}],
            "lr_schedulers": [{"T_max": 10, "last_epoch": 4, "_last_lr": [0.05]}],
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "best_model_score": torch.tensor(0.25), "best_model_path": "epoch=4.ckpt"}},
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": 4}}}},
            "hyper_parameters": {"lr": 0.1, "arch": "resnet18"}}


def test_an_averaged_model_checkpoint_loads_its_averaged_weights(tmp_path):
    """``AveragedModel``'s keys are ``module.`` ones beside its ``n_averaged`` count: both stripped, its logits."""
    averaged = averaged_resnet18()
    assert int(averaged.n_averaged) == 3
    torch.save(averaged.state_dict(), tmp_path / "swa.pt")
    for source in (averaged.state_dict(), tmp_path / "swa.pt"):
        model = cbam_resnet18(7)
        report = load_weights(source, model)
        assert_same_logits(model, averaged.module)
        assert report.stripped == ("module.", "n_averaged") and report.loaded == len(model.state_dict())
        assert "stripped 'module.' and AveragedModel's 'n_averaged'; loaded strictly" in str(report)
    stripped = strip_wrappers(nn.DataParallel(averaged).state_dict())  # DDP around SWA: module.n_averaged
    assert stripped.removed == ("module.", "n_averaged") and list(stripped.dropped) == ["module.n_averaged"]
    assert torch.equal(stripped.dropped["module.n_averaged"], averaged.n_averaged)
    assert list(stripped.state) == list(averaged.module.state_dict())


def test_n_averaged_is_stripped_only_beside_module_keys_and_as_one_integer():
    weights = {"module.fc.weight": torch.ones(2, 2)}
    for state in ({**weights, "n_averaged": torch.tensor(2.0)}, {**weights, "n_averaged": torch.tensor([1, 2])},
                  {**weights, "fc.bias": torch.ones(2), "n_averaged": torch.tensor(2)}):
        assert strip_wrappers(state).removed == (), state
    assert strip_wrappers({**weights, "n_averaged": torch.tensor([2], dtype=torch.int32)}).removed == \
        ("module.", "n_averaged")


def test_a_checkpoint_loads_into_an_averaged_model_keeping_its_n_averaged():
    source = cbam_resnet18(1)
    averaged = AveragedModel(cbam_resnet18(7))
    averaged.update_parameters(cbam_resnet18(8))
    report = load_weights(source.state_dict(), averaged)
    assert_same_logits(averaged.module.eval(), source)
    assert int(averaged.n_averaged) == 1 and report.n_averaged == 1 and report.stripped == ()
    assert report.loaded == len(source.state_dict())
    assert "loaded strictly" not in str(report) and "the model's AveragedModel 'n_averaged' (1) kept" in str(report)
    other = averaged_resnet18()  # an AveragedModel's checkpoint into an AveragedModel (resuming SWA): its count too
    report = load_weights(other.state_dict(), averaged)
    assert_same_logits(averaged.module.eval(), other.module)
    assert int(averaged.n_averaged) == 3 and report.stripped == ("module.", "n_averaged") and report.n_averaged_loaded
    assert "loaded strictly" in str(report) and "'n_averaged' (3) loaded too" in str(report)
    newest = cbam_resnet18(9)  # the average goes on as if never saved: (3 models + the newest) / 4
    averaged.update_parameters(newest)
    other.update_parameters(newest)
    torch.testing.assert_close(logits(averaged.module), logits(other.module), rtol=0, atol=0)  # not cached ones
    wrapped = torch.compile(AveragedModel(cbam_resnet18(7)))  # its keys: _orig_mod.n_averaged, _orig_mod.module.*
    report = load_weights(source.state_dict(), wrapped)
    assert_same_logits(wrapped._orig_mod.module, source)
    assert report.n_averaged == 0 and report.loaded == len(source.state_dict())
    assert "its next update_parameters copies the model over these weights" in str(report)


@pytest.mark.parametrize("attribute, preset, make", [("net", None, cbam_resnet18),
                                                     ("backbone", "timm", partial(timm_resnet, 18))],
                         ids=["ours-under-net", "timm-under-backbone"])
def test_a_lightning_checkpoint_loads_without_its_attribute_prefix(attribute, preset, make, tmp_path):
    source = make(seed=3)
    path = tmp_path / "epoch=4-step=500.ckpt"
    torch.save(lightning_checkpoint(source, attribute), path)
    torch.manual_seed(0)
    model = cbam.models.resnet18(num_classes=NUM_CLASSES, **({"preset": preset} if preset else {}))
    report = load_weights(path, model)
    assert_same_logits(model, source)
    assert report.entry == "state_dict" and report.stripped == (f"{attribute}.",)
    assert report.loaded == len(model.state_dict()) and report.layout.network == "ResNet-18"
    assert f"stripped '{attribute}.' (a wrapper module's attribute, such as a LightningModule's)" in str(report)


def test_an_attribute_prefix_is_stripped_only_when_every_key_has_it():
    source = cbam_resnet18(3)
    some = OrderedDict((f"net.{key}" if key.startswith("layer") else key, value)
                       for key, value in source.state_dict().items())
    with pytest.raises(ValueError, match=r"does not fit the model: \d+ missing and \d+ unexpected keys \(first: "
                                         r"missing 'layer1.0.conv1.weight', unexpected 'net.layer1.0.conv1.weight'\)"):
        load_weights(some, cbam_resnet18(7))
    deeper = lightning_checkpoint(cbam.models.resnet34(num_classes=NUM_CLASSES), "net")
    with pytest.raises(ValueError, match=r"the state dict \(its 'net.' prefix stripped\) does not fit the model: "
                                         r"0 missing and 120 unexpected keys \(first: unexpected "
                                         r"'layer1.2.conv1.weight'\); checkpoint: a ResNet-34 .* model: a ResNet-18"):
        load_weights(deeper, cbam_resnet18(7))


class Holder(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def test_keys_that_fit_are_not_stripped_when_the_model_has_the_prefix_too():
    source = Holder(cbam_resnet18(3))
    model = Holder(cbam_resnet18(7))
    report = load_weights(source.state_dict(), model)
    assert report.stripped == () and report.loaded == len(model.state_dict())
    assert_same_logits(model.net, source.net)


def test_cbam_convert_reads_averaged_models_and_with_model_lightning_checkpoints(tmp_path, capsys):
    averaged, lightning = averaged_resnet18(), cbam_resnet18(3)
    torch.save(averaged.state_dict(), tmp_path / "swa.pt")
    torch.save(lightning_checkpoint(lightning, "net"), tmp_path / "last.ckpt")
    assert main(["convert", str(tmp_path / "swa.pt"), str(tmp_path / "swa.safetensors")]) == 0
    assert re.search(r"a ResNet-18 in cbam's layout .*; stripped 'module.' and AveragedModel's 'n_averaged'",
                     capsys.readouterr().out)
    model = cbam_resnet18(7)
    model.load_state_dict(load_file(tmp_path / "swa.safetensors"), strict=True)
    assert_same_logits(model, averaged.module)
    assert main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "net.safetensors"), "--model", "resnet18",
                 "--num-classes", str(NUM_CLASSES)]) == 0
    assert "stripped 'net.' (a wrapper module's attribute" in capsys.readouterr().out
    model.load_state_dict(load_file(tmp_path / "net.safetensors"), strict=True)
    assert_same_logits(model, lightning)


# ------------------------------------------------------------------------------------------- errors


class RunsCode:
    """A pickle whose loading would run a shell command (``__reduce__``)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _truncated(path, source):
    save_weights(path, source.state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD = {
    "truncated .pt": (lambda d: _truncated(d / "t.pt", nn.Linear(64, 64)), r"cannot read checkpoint '.*t.pt': "),
    "truncated .safetensors": (lambda d: _truncated(d / "t.safetensors", nn.Linear(64, 64)),
                               r"cannot read checkpoint '.*t.safetensors': "),
    "text file": (lambda d: (d / "notes.pth").write_text("hello") and d / "notes.pth",
                  r"cannot read checkpoint '.*notes.pth': "),
    "no state dict": (lambda d: torch.save({"epoch": 3, "arch": "resnet"}, d / "meta.pt") or d / "meta.pt",
                      r"holds no state dict: expected a dict of tensors, or a dict with one under 'model'; got a dict "
                      r"with keys \['epoch', 'arch'\]"),
    "another depth": (lambda d: torch.save(cbam.models.resnet50(num_classes=10).state_dict(), d / "r50.pt")
                      or d / "r50.pt",
                      r"does not fit the model: size mismatch for layer1.0.conv1.weight: found "
                      r"torch.Size\(\[64, 64, 1, 1\]\) .*expected torch.Size\(\[64, 64, 3, 3\]\) \(and 39 more\); "
                      # 222: the keys of cbam.models.resnet50 that resnet18 lacks (layer1.0.conv3, layer3.2-5, ...)
                      r"0 missing and 222 unexpected keys \(first: unexpected 'layer1.0.conv3.weight'\); "
                      r"checkpoint: a ResNet-50 in cbam's layout .*model: a ResNet-18 in cbam's layout"),
    "a non-tensor beside the weights": (lambda d: torch.save({"state_dict": {**nn.Linear(2, 2).state_dict(),
                                                                            "epoch": 3}}, d / "e.pt") or d / "e.pt",
                                        r"holds no state dict: .*; under 'state_dict', 'epoch' holds int, not a "
                                        r"tensor"),
    "a sparse tensor": (lambda d: torch.save({**cbam.models.resnet18(num_classes=NUM_CLASSES).state_dict(),
                                              "fc.bias": torch.zeros(NUM_CLASSES).to_sparse()}, d / "s.pt")
                        or d / "s.pt",
                        r"does not fit the model: 'fc.bias' is a torch.sparse_coo tensor; expected a dense one"),
    "a safetensors file named .pt": (lambda d: save_weights(d / "w.safetensors", nn.Linear(2, 2).state_dict())
                                     .rename(d / "w.pt") or d / "w.pt",
                                     r"cannot read checkpoint '.*w.pt': it is no torch.save file but looks like a "
                                     r"safetensors file: name it .safetensors"),
    "another architecture": (lambda d: torch.save(torchvision.models.squeezenet1_1().state_dict(), d / "sq.pt")
                             or d / "sq.pt",
                             r"missing and \d+ unexpected keys \(first: missing 'conv1.weight', unexpected "
                             r"'features.0.weight'\); checkpoint: a network without attention, model: a ResNet-18"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_files_are_refused_in_one_line_and_the_model_is_untouched(case, tmp_path):
    make, pattern = BAD[case]
    path = make(tmp_path)
    torch.manual_seed(0)
    model = cbam.models.resnet18(num_classes=NUM_CLASSES)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=pattern) as info:
        load_weights(path, model)
    assert "\n" not in str(info.value)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth.tar"
    torch.save({"state_dict": nn.Linear(2, 2).state_dict(), "extra": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=r"cannot read checkpoint '.*evil.pth.tar': weights-only loading \(tensors "
                                         r"and plain containers, never code\) refused it: .*system") as info:
        load_weights(path, nn.Linear(2, 2))
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_mixed_layouts_and_bad_arguments():
    state = {"a.channel_att.fc1.weight": torch.ones(1, 4), "b.ChannelGate.mlp.1.weight": torch.ones(1, 4)}
    with pytest.raises(ValueError, match="mixes CBAM layouts: cbam .at 'a'. and official .at 'b'."):
        load_weights(state, nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expects an nn.Module to load into, got dict"):
        load_weights(state, {})
    with pytest.raises(TypeError, match="expects a path or a checkpoint dict, got int"):
        load_weights(3, nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"has no entry 'state_dict_ema': found entries \['model'\]"):
        load_weights({"model": nn.Linear(2, 2).state_dict()}, nn.Linear(2, 2), entry="state_dict_ema")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights("/nonexistent/x.pt", nn.Linear(2, 2))


def test_a_cbam_the_models_layout_cannot_express_is_refused_naming_both(sources):
    with pytest.raises(ValueError, match=r"the state dict does not fit the model: to_official: the target layout's "
                                         r"CBAM has MLP biases .*; checkpoint: a ResNet-50 in timm's layout .*, model: "
                                         r"a ResNet-50 in the official CBAM code's layout"):
        load_weights(sources.timm.state_dict(), copy.deepcopy(sources.official))


def test_save_weights_refuses_what_is_no_state_dict(tmp_path):
    cases = [(nn.Linear(2, 2), TypeError, r"got the module Linear: pass model.state_dict\(\)"),
             ({"w": torch.ones(1), "epoch": 3}, TypeError, "expects a state dict of tensors, got int under 'epoch'"),
             ({1: torch.ones(1)}, TypeError, r"expects a state dict with str keys, got the key 1 \(int\)"),
             ({}, ValueError, "the state dict is empty")]
    for name in ("w.pt", "w.safetensors"):
        for state, error, pattern in cases:
            with pytest.raises(error, match=pattern):
                save_weights(tmp_path / name, state)
        with pytest.raises(TypeError, match=r"takes the path first, got OrderedDict as the path \(torch.save's order"):
            save_weights(nn.Linear(2, 2).state_dict(), tmp_path / name)  # torch.save's order
    with pytest.raises(TypeError, match=r"expects a path \(str or os.PathLike\) first, got int"):
        save_weights(3, {"w": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []


def test_safetensors_without_the_package_names_the_extra(tmp_path, monkeypatch):
    path = save_weights(tmp_path / "w.safetensors", nn.Linear(2, 2).state_dict())
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"need the safetensors package: pip install 'cbam\[convert\]'"):
        load_weights(path, nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="safetensors package"):
        save_weights(tmp_path / "x.safetensors", nn.Linear(2, 2).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_timm_light_cbam_resnet_loads_into_a_light_cbam_resnet():
    """timm's ``attn_layer="lcbam"`` (LightCbamModule: one pooled map per gate) into ``cbam.models`` with
    the light CBAM's pooling: timm's logits. Into a CBAM model (two maps) it is refused, naming both."""
    torch.manual_seed(0)
    theirs = timm.create_model("resnet18", block_args={"attn_layer": "lcbam"}, num_classes=NUM_CLASSES)
    theirs = perturb(theirs, 5, attention_only_params=".se.")
    light = cbam.models.resnet18(num_classes=NUM_CLASSES, preset="timm", pool_types=("mix",), spatial_pool="mix")
    report = load_weights(theirs.state_dict(), light)
    assert report.converted == "timm -> cbam" and report.loaded == len(light.state_dict())
    assert_same_logits(light, theirs)
    with pytest.raises(ValueError, match=r"size mismatch for layer1.0.cbam.spatial_att.conv.weight: found "
                                         r"torch.Size\(\[1, 1, 7, 7\]\) .* \(a conv over one pooled map is a light "
                                         r"CBAM's: LightCBAM, or pool_types=\('mix',\)"):
        load_weights(theirs.state_dict(), cbam.models.resnet18(num_classes=NUM_CLASSES, preset="timm"))


def test_an_attribute_holding_an_averaged_model_is_unwrapped_below_the_prefix():
    """``self.net = AveragedModel(model)`` in a LightningModule: ``net.module.*`` and ``net.n_averaged``."""
    averaged = averaged_resnet18()
    state = OrderedDict((f"net.{key}", value) for key, value in averaged.state_dict().items())
    model = cbam_resnet18(7)
    report = load_weights(state, model)
    assert_same_logits(model, averaged.module)
    assert report.stripped == ("net.", "module.", "n_averaged") and report.loaded == len(model.state_dict())
    into = AveragedModel(cbam_resnet18(7))  # and into an AveragedModel: its count comes along
    assert load_weights(state, into).n_averaged_loaded and int(into.n_averaged) == 3


def test_keys_made_the_same_by_stripping_are_named():
    state = {"layer1._orig_mod.conv.weight": torch.ones(1), "layer1.conv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"stripping wrapper prefixes made two keys 'layer1.conv.weight'; the "
                                         r"checkpoint mixes wrapped and unwrapped names"):
        strip_wrappers(state)
