"""``cbam convert``: checkpoints from the official code and timm written as ours, timm's or the official
layout (.safetensors or .pt), loading in timm and in our models; bad input ends in one line, nothing written."""

from __future__ import annotations

import re
import shutil
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers.cbam import CbamModule

import cbam
from cbam.cli import main
from test_load_weights import RunsCode

from wild_checkpoints import NUM_CLASSES, Sources, assert_same_logits

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return Sources.shared(tmp_path_factory, depth=18)


def convert(capsys, *args):
    status = main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_official_pth_tar_to_our_safetensors(sources, tmp_path, capsys):
    out = tmp_path / "cbam_resnet18.safetensors"
    status, printed, _ = convert(capsys, sources.official_path, out)
    assert status == 0
    assert re.search(r"a ResNet-18 in the official CBAM code's layout .* with 8 CBAMs under 'state_dict'; "
                     r"stripped 'module.'", printed)
    assert f"converted official -> cbam; wrote {out}" in printed
    model = cbam.models.resnet18(num_classes=NUM_CLASSES, preset="official")
    model.load_state_dict(load_file(out), strict=True)  # plain safetensors of our keys: no loader needed
    assert_same_logits(model, sources.official)


def test_timm_checkpoint_to_timm_and_ours(sources, tmp_path, capsys):
    """timm's file -> ours (.pt) -> timm's layout (.safetensors, as --model checks it) -> timm itself."""
    ours_path, timm_path = tmp_path / "ours.pt", tmp_path / "timm.safetensors"
    assert convert(capsys, sources.timm_path, ours_path)[0] == 0
    model = cbam.models.resnet18(num_classes=NUM_CLASSES, preset="timm")
    model.load_state_dict(torch.load(ours_path, weights_only=True), strict=True)
    assert_same_logits(model, sources.timm)

    status, printed, _ = convert(capsys, ours_path, timm_path, "--to", "timm", "--model", "resnet18", "--preset",
                                 "timm", "--num-classes", NUM_CLASSES)
    assert status == 0 and "loaded strictly" in printed and "converted cbam -> timm" in printed
    theirs = timm.create_model("resnet18", block_args={"attn_layer": "cbam"}, num_classes=NUM_CLASSES)
    theirs.load_state_dict(load_file(timm_path), strict=True)
    assert_same_logits(theirs, sources.timm)


def test_to_official_and_back(sources, tmp_path, capsys):
    official, back = tmp_path / "official.pth.tar", tmp_path / "back.safetensors"
    assert convert(capsys, sources.official_path, official, "--to", "official")[0] == 0
    expected = {key.removeprefix("module."): value for key, value in torch.load(
        sources.official_path, weights_only=True)["state_dict"].items()}
    written = torch.load(official, weights_only=True)
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[key], value) for key, value in expected.items())
    assert convert(capsys, official, back)[0] == 0
    model = cbam.models.resnet18(num_classes=NUM_CLASSES, preset="official")
    model.load_state_dict(load_file(back), strict=True)
    assert_same_logits(model, sources.official)


def test_official_to_timm_notes_the_mlp_biases(sources, tmp_path, capsys):
    """The official CBAMs' MLP biases have no place in timm's ``attn_layer="cbam"`` ResNets: the file is written for
    ``CbamModule(mlp_bias=True)``, which computes the official logits, and a note on stderr says so."""
    out = tmp_path / "timm.safetensors"
    status, printed, err = convert(capsys, sources.official_path, out, "--to", "timm")
    assert status == 0 and "converted official -> timm" in printed
    assert err.count("\n") == 1 and "CbamModule(mlp_bias=True)" in err and "attn_layer='cbam' ResNets" in err
    theirs = timm.create_model("resnet18", num_classes=NUM_CLASSES,
                               block_args={"attn_layer": partial(CbamModule, mlp_bias=True)})
    theirs.load_state_dict(load_file(out), strict=True)
    assert_same_logits(theirs, sources.official)


def _truncated(directory):
    path = directory / "cut.pth"
    torch.save(torch.nn.Linear(64, 64).state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    return path


ERRORS = {
    "truncated file": (lambda d, s: [_truncated(d), d / "out.pt"], r"cannot read checkpoint '.*cut.pth': "),
    "not a checkpoint": (lambda d, s: [(d / "a.pt").write_text("hello") and d / "a.pt", d / "out.pt"],
                         r"cannot read checkpoint '.*a.pt': "),
    "code in the pickle": (lambda d, s: [torch.save({"state_dict": {}, "x": RunsCode(d / "pwned")}, d / "e.pt")
                                         or d / "e.pt", d / "out.pt"],
                           r"weights-only loading .* refused it: .*system"),
    "another depth": (lambda d, s: [s.official_path, d / "out.pt", "--model", "resnet34", "--preset", "official",
                                    "--num-classes", NUM_CLASSES],
                      # ResNet-34's 8 more blocks x (2 convs, 2 BNs x 4, CBAM 10 - 1): batch counters are not
                      # counted (a missing one is tolerated)
                      rf"does not fit the model: {8 * 19} missing and 0 unexpected keys \(first: missing "
                      r"'layer1.2.conv1.weight'\); checkpoint: a ResNet-18 in the official .*, model: a ResNet-34 "
                      r"in cbam's layout .* with 16 CBAMs"),
    "another preset": (lambda d, s: [s.timm_path, d / "out.pt", "--to", "official"],
                       r"to_official: the target layout's CBAM has MLP biases"),
    "missing folder": (lambda d, s: [s.timm_path, d / "missing" / "out.safetensors"],
                       r"cannot write '.*out.safetensors': directory '.*missing' does not exist"),
    "existing output": (lambda d, s: [s.timm_path, (d / "out.pt").write_bytes(b"keep") and d / "out.pt"],
                        r"'.*out.pt' exists; pass --force to replace it"),
    "output is the input, forced": (lambda d, s: [_copy(s.timm_path, d / "ckpt.pt"), d / "ckpt.pt", "--force"],
                                    r"cannot write '.*ckpt.pt': it is the input '.*ckpt.pt'; name another file$"),
    "output links to the input": (lambda d, s: [_copy(s.timm_path, d / "ckpt.pt"), _link(d / "ckpt.pt", d / "l.pt"),
                                                "--force"],
                                  r"cannot write '.*l.pt': it is the input '.*ckpt.pt'; name another file$"),
    "unknown suffix": (lambda d, s: [s.timm_path, d / "out.h5"], r"must end in .safetensors, .pt, .* got '.*out.h5'"),
    "output is a folder": (lambda d, s: [s.timm_path, (d / "dir.pt").mkdir() or d / "dir.pt", "--force"],
                           r"error: cannot write '.*dir.pt': it is a directory$"),
    "unknown entry of a flat state dict": (lambda d, s: [_flat(d), d / "out.pt", "--entry", "x"],
                                           r"has no entry 'x': found 146 entries \['conv1.weight', 'bn1.weight', "
                                           r"'bn1.bias', 'bn1.running_mean', 'bn1.running_var', \.\.\.\]$"),
}


def _copy(source, path):
    shutil.copyfile(source, path)
    return path


def _link(target, path):
    path.symlink_to(target)
    return path


def _flat(directory):
    """A file holding a bare state dict: ResNet-18 + CBAM's 146 tensors, conv1.weight first."""
    path = directory / "flat.pt"
    torch.save(cbam.models.resnet18(num_classes=NUM_CLASSES).state_dict(), path)
    return path


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line_and_write_nothing(case, sources, tmp_path, capsys):
    make, pattern = ERRORS[case]
    arguments = make(tmp_path, sources)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    status, printed, err = convert(capsys, *arguments)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("cbam convert: error: ") and re.search(pattern, err), err
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    assert not (tmp_path / "pwned").exists()


def test_force_replaces_an_existing_output(sources, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    assert convert(capsys, sources.official_path, out, "--force")[0] == 0
    assert len(load_file(out)) == len(cbam.models.resnet18(preset="official").state_dict())
    assert [path.name for path in tmp_path.iterdir()] == ["out.safetensors"]  # no temporary file left
