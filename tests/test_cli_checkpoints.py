"""Every ``--checkpoint`` (``visualize``, ``eval``) and ``train --init-from`` takes the official code's,
timm's and torchvision's checkpoints: the model the command builds computes the source's logits.

Sources are ResNet-18s here (the loader's ResNet-50 cases are ``test_load_weights``'s). The
commands build their model from ``--model test_cli_checkpoints:FACTORY`` (or, in ``train``,
by name); the factories keep what they built, and ``train``'s loader is wrapped to keep the model
as the weights arrive (then stop the run: the training itself is ``test_train_loop``'s).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cbam
import cbam.train.loop
from cbam.cli import main

from wild_checkpoints import NUM_CLASSES, Sources, assert_same_logits, torchvision_resnet

torch.set_num_threads(2)
BUILT: list[torch.nn.Module] = []


def official_target():
    BUILT.append(cbam.models.resnet18(num_classes=NUM_CLASSES, preset="official"))
    return BUILT[-1]


def timm_target():
    BUILT.append(cbam.models.resnet18(num_classes=NUM_CLASSES, preset="timm"))
    return BUILT[-1]


def plain_target():
    BUILT.append(cbam.models.resnet18(num_classes=NUM_CLASSES, attention=None))
    return BUILT[-1]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return Sources.shared(tmp_path_factory, depth=18)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(autouse=True)
def _forget_built():
    BUILT.clear()


CASES = [("official", "official_target"), ("timm", "timm_target")]


@pytest.mark.parametrize(("source", "factory"), CASES)
def test_visualize_checkpoint(source, factory, sources, image, tmp_path, capsys):
    out = tmp_path / "figure.svg"
    status = main(["visualize", "--model", f"test_cli_checkpoints:{factory}", "--checkpoint",
                   str(getattr(sources, f"{source}_path")), "--image", str(image), "--size", "32",
                   "--layers", "layer4.1.cbam", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0 and out.exists()
    assert f"converted {source} -> cbam" in printed and "loaded strictly" in printed
    assert_same_logits(BUILT[-1], getattr(sources, source))


@pytest.mark.parametrize(("source", "factory"), [*CASES, ("torchvision", "plain_target")])
def test_eval_checkpoint(source, factory, sources, tmp_path, capsys):
    status = main(["eval", "--checkpoint", str(getattr(sources, f"{source}_path")), "--model",
                   f"test_cli_checkpoints:{factory}", "--data", "synthetic:4,4", "--batch-size", "4",
                   "--out", str(tmp_path / "confusion.png"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["images"] == 4 and "loaded strictly" in report["weights"]
    assert_same_logits(BUILT[-1], getattr(sources, source))


def test_eval_needs_model_and_data_for_other_checkpoints(sources, capsys):
    assert main(["eval", "--checkpoint", str(sources.timm_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not written by cbam train" in err and "--model and --data" in err


def test_eval_refuses_a_class_count_other_than_the_datas(sources, capsys):
    """``--num-classes`` that is not the data's class count: one line naming both, before any weights load (the
    confusion matrix once failed with a reshape error)."""
    status = main(["eval", "--checkpoint", str(sources.timm_path), "--model", "resnet18", "--num-classes", "1000",
                   "--data", "synthetic:4,4"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "--num-classes 1000: --data synthetic:4,4 has 10 classes" in err


def test_eval_refuses_to_write_its_figure_over_the_checkpoint(sources, tmp_path, capsys):
    """``--out`` naming the checkpoint (here a PNG-named copy of it): refused before anything is written."""
    checkpoint = tmp_path / "weights.png"
    checkpoint.write_bytes(sources.timm_path.read_bytes())
    status = main(["eval", "--checkpoint", str(checkpoint), "--model", "resnet18", "--data", "synthetic:4,4",
                   "--out", str(checkpoint)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "it is the input" in err
    assert checkpoint.read_bytes() == sources.timm_path.read_bytes()


class _Stop(BaseException):
    """Ends ``cbam train`` once the weights are in the model (no ``Exception``: the CLI reports those in a line)."""


def _init_from(monkeypatch, tmp_path, path, *model_args):
    """Run ``cbam train --init-from path`` up to its first step; the model as the weights arrived."""
    seen = {}
    real = cbam.train.loop.load_weights

    def spy(source, model, **kwargs):
        seen["report"] = real(source, model, **kwargs)
        seen["model"] = copy.deepcopy(model)
        raise _Stop

    monkeypatch.setattr(cbam.train.loop, "load_weights", spy)
    with pytest.raises(_Stop):
        main(["train", *model_args, "--data", "synthetic:4,4", "--batch-size", "4", "--epochs", "1",
              "--no-progress", "--out", str(tmp_path / "run"), "--init-from", str(path)])
    return seen["model"], seen["report"]


@pytest.mark.parametrize(("source", "model_args"), [
    ("official", ["--model", "resnet18", "--preset", "official"]),
    ("timm", ["--model", "resnet18", "--preset", "timm"]),
    ("torchvision", ["--model", "resnet18", "--attention", "none"]),
])
def test_train_init_from(source, model_args, sources, monkeypatch, tmp_path):
    model, report = _init_from(monkeypatch, tmp_path, getattr(sources, f"{source}_path"), *model_args)
    assert_same_logits(model, getattr(sources, source))
    assert not report.left_at_init and not report.new_head


def test_train_init_from_imagenet_backbone_into_cbam(monkeypatch, tmp_path):
    """torchvision's 1000-class ResNet-18 into ResNet-18 + CBAM for 10 classes: backbone loaded, attention and
    head as a fresh seeded model has them (cbam train seeds 0 before building)."""
    source = torchvision_resnet(18, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    model, report = _init_from(monkeypatch, tmp_path, tmp_path / "imagenet.pth", "--model", "resnet18")
    torch.manual_seed(0)
    fresh = cbam.models.resnet18(num_classes=NUM_CLASSES).state_dict()
    state = model.state_dict()
    attention = [key for key in state if ".cbam." in key]
    assert sorted(report.left_at_init) == sorted(attention) and report.new_head == ("fc.weight", "fc.bias")
    for key, value in state.items():
        expected = fresh[key] if key in attention or key.startswith("fc.") else source.state_dict()[key]
        assert torch.equal(value, expected), key


def _lightning_checkpoint(path):
    """A LightningModule's checkpoint holding ``self.net = model`` and ``self.ema = AveragedModel(model)`` (a
    ResNet-18 + CBAM for ``NUM_CLASSES``): ``net.*``, ``ema.module.*`` (the floating tensors ``net``'s + 1) and
    ``ema.n_averaged``; returns the EMA's state dict."""
    net = cbam.models.resnet18(num_classes=NUM_CLASSES).state_dict()
    ema = {key: value + 1 if value.is_floating_point() else value.clone() for key, value in net.items()}
    state = {**{f"net.{key}": value for key, value in net.items()},
             **{f"ema.module.{key}": value for key, value in ema.items()}, "ema.n_averaged": torch.tensor(3)}
    torch.save({"state_dict": state, "epoch": 7}, path)
    return ema


def test_train_init_prefix_loads_the_ema(monkeypatch, tmp_path):
    """``--init-prefix ema``: the model before its first step holds the EMA's tensors (not the raw ``net``'s)."""
    ema = _lightning_checkpoint(tmp_path / "last.ckpt")
    model, report = _init_from(monkeypatch, tmp_path, tmp_path / "last.ckpt", "--init-prefix", "ema")
    assert report.stripped[0] == "ema." and not report.left_at_init and not report.new_head
    assert model.state_dict().keys() == ema.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key


def test_train_init_prefix_run_prints_it_and_resumes(tmp_path, capsys):
    """A whole run from a checkpoint's EMA: the printed report names the prefix; the checkpoint's config holds the
    run settings only (as before ``init_prefix`` existed), so ``--resume`` continues without the init flags."""
    from cbam.train import read_checkpoint
    from cbam.train.checkpoint import RUN_SETTINGS

    _lightning_checkpoint(tmp_path / "last.ckpt")
    args = ["train", "--data", "synthetic:4,4", "--batch-size", "4", "--epochs", "2", "--no-progress",
            "--out", str(tmp_path / "run")]
    assert main([*args, "--stop-after", "1", "--init-from", str(tmp_path / "last.ckpt"), "--init-prefix", "ema"]) == 0
    printed = capsys.readouterr().out
    assert "stripped 'ema.'" in printed and "loaded strictly" in printed
    assert set(read_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]) == set(RUN_SETTINGS)
    assert main([*args, "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2


def test_train_init_from_with_two_prefixes_needs_init_prefix(tmp_path, capsys):
    """Without ``--init-prefix`` a checkpoint holding ``net`` and ``ema`` is refused in one line naming both and
    the flag to pick one; nothing is left behind."""
    _lightning_checkpoint(tmp_path / "last.ckpt")
    status = main(["train", "--data", "synthetic:4,4", "--batch-size", "4", "--epochs", "1", "--no-progress",
                   "--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "last.ckpt")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("cbam train: error: ")
    assert "'net'" in err and "'ema'" in err and "--init-prefix" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_init_prefix_needs_init_from(tmp_path, capsys):
    status = main(["train", "--data", "synthetic:4,4", "--out", str(tmp_path / "run"), "--init-prefix", "ema"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "--init-prefix" in err and "without --init-from" in err
    assert not (tmp_path / "run").exists()
