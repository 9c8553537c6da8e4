"""``load_weights(..., prefix=)`` and ``--prefix``: a LightningModule holding ``self.net = model`` and
``self.ema = AveragedModel(model)`` saves both under one ``state_dict``; the prefix picks which loads."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

import cbam
from cbam.cli import main
from cbam.convert import load_weights

NUM_CLASSES = 10


def resnet18(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cbam.models.resnet18(num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def lightning():
    """``(checkpoint, net's tensors, ema's tensors)``: distinct weights under ``net.`` and ``ema.module.``, and
    ``ema.n_averaged`` 5."""
    net, ema = resnet18(0).state_dict(), resnet18(1).state_dict()
    ema = {key: value + 0.01 if value.is_floating_point() else value + 7 for key, value in ema.items()}
    assert not any(torch.equal(net[key], ema[key]) for key in net)
    state = {**{f"net.{key}": value for key, value in net.items()},
             **{f"ema.module.{key}": value for key, value in ema.items()}, "ema.n_averaged": torch.tensor(5)}
    return {"epoch": 3, "state_dict": state}, net, ema


def assert_holds(model: torch.nn.Module, tensors: dict) -> None:
    state = model.state_dict()
    assert list(state) == list(tensors)
    for key, value in tensors.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("prefix", ["ema", "ema."])
def test_prefix_ema_loads_exactly_the_ema_tensors(lightning, prefix):
    checkpoint, _, ema = lightning
    model = resnet18(2)
    report = load_weights(checkpoint, model, prefix=prefix)
    assert_holds(model, ema)
    assert report.stripped == ("ema.", "module.", "n_averaged") and report.loaded == len(ema)
    assert "stripped 'ema.' (a wrapper module's attribute" in str(report)


def test_prefix_net_loads_exactly_the_net_tensors(lightning):
    checkpoint, net, _ = lightning
    model = resnet18(2)
    report = load_weights(checkpoint, model, prefix="net")
    assert_holds(model, net)
    assert report.stripped == ("net.",) and "loaded strictly" in str(report)


def test_prefix_ema_into_an_averaged_model_takes_its_n_averaged(lightning):
    checkpoint, _, ema = lightning
    averaged = AveragedModel(resnet18(2))
    report = load_weights(checkpoint, averaged, prefix="ema")
    assert int(averaged.n_averaged) == 5 and report.n_averaged == 5 and report.n_averaged_loaded
    assert_holds(averaged.module, ema)


def test_a_prefix_no_key_has_is_refused_naming_the_prefixes_there_are(lightning):
    checkpoint, _, _ = lightning
    model = resnet18(2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^the state dict has no keys under the prefix 'model.': its keys sit "
                                         r"under 'net', 'ema'$"):
        load_weights(checkpoint, model, prefix="model")
    assert_holds(model, before)
    with pytest.raises(ValueError, match="none of its keys has a prefix"):
        load_weights({"weight": torch.ones(2, 2)}, torch.nn.Linear(2, 2), prefix="ema")
    with pytest.raises(ValueError, match=r"prefix expects a key prefix such as 'ema', got '\.'"):
        load_weights(checkpoint, model, prefix=".")
    with pytest.raises(TypeError, match="prefix expects a str such as 'ema', got int"):
        load_weights(checkpoint, model, prefix=1)


def test_without_a_prefix_the_refusal_names_the_prefixes_to_pick_from(lightning):
    checkpoint, _, _ = lightning
    expected = ("the state dict does not fit the model: its keys sit under the prefixes 'net', 'ema', which the "
                "model's keys lack: pick one with prefix='net' or prefix='ema' (on the command line --prefix, or "
                "--init-prefix for cbam train --init-from); checkpoint: ")
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        load_weights(checkpoint, resnet18(2))
    net = resnet18(0).state_dict()  # only prefixes the model's keys sit under are offered
    state = {**{f"net.{key}": value for key, value in net.items()}, "criterion.weight": torch.ones(NUM_CLASSES)}
    with pytest.raises(ValueError, match=r"under the prefixes 'net', 'criterion', .* pick one with prefix='net' "
                                         r"\(on the command line --prefix"):
        load_weights(state, resnet18(2))


def test_prefixes_the_model_lacks_and_no_key_of_it_under_them_are_no_hint():
    """Another network's keys (``features.``, ``classifier.``) or prefixes the model has: the usual message."""
    state = {"features.0.weight": torch.ones(2, 2), "classifier.1.weight": torch.ones(2, 2)}
    with pytest.raises(ValueError, match=r"2 missing and 2 unexpected keys \(first: missing 'weight', "):
        load_weights(state, torch.nn.Linear(2, 2))
    model = torch.nn.Sequential()
    model.add_module("net", torch.nn.Linear(2, 2))
    state = {"net.weight": torch.ones(2, 2), "net.bias": torch.ones(2), "head.weight": torch.ones(1, 2)}
    with pytest.raises(ValueError, match=r"0 missing and 1 unexpected keys \(first: unexpected 'head.weight'\)"):
        load_weights(state, model)


def test_the_hint_offers_only_prefixes_that_load():
    """A student/teacher checkpoint (another ResNet under ``teacher.``) and a second head of 1000 classes: the
    hint names only the prefix whose keys the model takes, and that prefix then loads (audit: it offered any
    prefix sharing a key name)."""
    net = resnet18(0).state_dict()
    torch.manual_seed(1)
    teacher = cbam.models.resnet34(num_classes=NUM_CLASSES).state_dict()
    other_head = cbam.models.resnet18(num_classes=1000).state_dict()
    state = {**{f"net.{key}": value for key, value in net.items()},
             **{f"teacher.{key}": value for key, value in teacher.items()},
             **{f"in1k.{key}": value for key, value in other_head.items()}}
    with pytest.raises(ValueError, match=r"prefixes 'net', 'teacher', 'in1k', which the model's keys lack: pick one "
                                         r"with prefix='net' \("):
        load_weights(state, resnet18(2))
    model = resnet18(2)
    load_weights(state, model, prefix="net")
    assert_holds(model, net)


def test_visualize_prefix_without_checkpoint_is_one_line(tmp_path, capsys):
    """``--prefix`` picks keys of ``--checkpoint``: without one it was ignored and the maps came from an untrained
    model (audit)."""
    out = tmp_path / "figure.png"
    status = main(["visualize", "--model", "resnet18", "--prefix", "ema", "--image", str(tmp_path / "any.jpg"),
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "--prefix picks the keys --checkpoint loads" in err
    assert not out.exists()


@pytest.mark.parametrize("model_args", [[], ["--model", "resnet18", "--num-classes", str(NUM_CLASSES)]],
                         ids=["keys-only", "with-model"])
def test_cbam_convert_prefix_ema_writes_the_ema_tensors(lightning, model_args, tmp_path, capsys):
    checkpoint, _, ema = lightning
    torch.save(checkpoint, tmp_path / "last.ckpt")
    out = tmp_path / "ema.safetensors"
    assert main(["convert", str(tmp_path / "last.ckpt"), str(out), "--prefix", "ema", *model_args]) == 0
    assert "stripped 'ema.' (a wrapper module's attribute" in capsys.readouterr().out
    written = load_file(out)
    assert set(written) == set(ema) and all(torch.equal(written[key], value) for key, value in ema.items())


@pytest.mark.parametrize("model_args, message", [
    ([], "has no keys under the prefix 'emma.': its keys sit under 'net', 'ema'"),
    (["--model", "resnet18", "--num-classes", str(NUM_CLASSES)], "has no keys under the prefix 'emma.'"),
], ids=["keys-only", "with-model"])
def test_cbam_convert_bad_prefix_is_one_line(lightning, model_args, message, tmp_path, capsys):
    checkpoint, _, _ = lightning
    torch.save(checkpoint, tmp_path / "last.ckpt")
    out = tmp_path / "ema.safetensors"
    status = main(["convert", str(tmp_path / "last.ckpt"), str(out), "--prefix", "emma", *model_args])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("cbam convert: error: ") and message in err, err
    assert not out.exists()


def test_cbam_convert_without_prefix_suggests_it(lightning, tmp_path, capsys):
    checkpoint, _, _ = lightning
    torch.save(checkpoint, tmp_path / "last.ckpt")
    status = main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "out.safetensors"), "--model", "resnet18",
                   "--num-classes", str(NUM_CLASSES)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "'net', 'ema'" in err and "--prefix" in err, err


def test_cbam_eval_prefix(lightning, tmp_path, capsys):
    checkpoint, _, _ = lightning
    torch.save(checkpoint, tmp_path / "last.ckpt")
    status = main(["eval", "--checkpoint", str(tmp_path / "last.ckpt"), "--model", "resnet18", "--data",
                   "synthetic:4,4", "--batch-size", "4", "--out", str(tmp_path / "confusion.png"), "--json",
                   "--prefix", "ema"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    report = json.loads(captured.out)
    assert "stripped 'ema.'" in report["weights"] and "loaded strictly" in report["weights"]
