"""``cbam trace``, ``cbam check`` and ``cbam profile``: happy paths, failures, and one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import cbam
from cbam.cli import main

SMALL = ["--model", "resnet18", "--input", "1,3,64,64"]


class Cancel(nn.Module):
    """``1 / (x - 1)``: finite in float32 for x = 1.001, infinite once autocast rounds x to 1."""

    def forward(self, x):
        return 1 / (x - 1)


def cancelling_model() -> nn.Module:
    """A ``--model`` factory (``test_cli_tools:cancelling_model``): a Linear that outputs 1.001 whatever
    its input (zero weight), which bfloat16 rounds to 1, then ``Cancel``."""
    linear = nn.Linear(12, 4)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(1.001)
    return nn.Sequential(nn.Flatten(), linear, Cancel())


def tiny_model() -> nn.Module:
    """A ``--model`` factory (``test_cli_tools:tiny_model``): a conv, then a CBAM with a double backward."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), cbam.CBAM(8, 4, 3, impl="reference"))


class Raises(nn.Module):
    """A forward that raises ``KeyError`` (any error a user's model may raise), or, where ``interrupted``, the
    ``RuntimeError`` that torch's file writer raises when a Ctrl-C arrives mid-write."""

    def __init__(self, interrupted: bool = False):
        super().__init__()
        self.interrupted = interrupted

    def forward(self, x):
        if not self.interrupted:
            raise KeyError("inside forward")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 61054272") from None


def raising_model() -> nn.Module:
    return Raises()


def interrupted_model() -> nn.Module:
    return Raises(interrupted=True)


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_trace_prints_every_block_and_cbam_steps(capsys):
    status, out, err = run(capsys, "trace", *SMALL)
    assert status == 0 and err == ""
    assert "layer1.0.cbam.spatial_att:gate" in out and "(1, 1, 16, 16)" in out and "(1, 1000)" in out


def test_trace_json_and_a_failing_forward(capsys):
    status, out, _ = run(capsys, "trace", *SMALL, "--attention", "none", "--json")
    rows = json.loads(out)["rows"]
    assert status == 0 and rows[-1]["path"] == "fc" and not any("cbam" in row["path"] for row in rows)
    status, out, err = run(capsys, "trace", "--model", "resnet18", "--input", "1,4,64,64")
    assert status == 1 and "failed in conv1 (Conv2d)" in out and "(1, 4, 64, 64)" in out
    assert err.startswith("cbam trace: error: the forward failed in conv1 (Conv2d): RuntimeError: ")
    assert err.count("\n") == 1 and "expected input[1, 4, 64, 64] to have 3 channels" in err


def test_check_passes_resnet18_with_cbam(capsys):
    status, out, _ = run(capsys, "check", *SMALL, "--json")
    data = json.loads(out)
    assert status == 0 and data["ok"] and data["amp"]["dtype"] == "bfloat16"
    assert sorted(data["gradients"]) == sorted(f"layer{s}.{b}.cbam" for s in range(1, 5) for b in range(2))
    assert data["gradients"]["layer1.0.cbam"]["tensors"][0]["shape"] == [1, 64, 5, 5]  # cropped to 5x5


def test_check_full_jacobians_and_whole_model(capsys):
    status, out, _ = run(capsys, "check", "--model", "test_cli_tools:tiny_model", "--input", "2,3,7,7", "--full",
                         "--gradgrad", "--json")
    data = json.loads(out)
    assert status == 0 and list(data["gradients"]) == ["1"]
    assert data["gradients"]["1"]["mode"] == "full" and data["gradients"]["1"]["tensors"][0]["shape"] == [1, 8, 5, 5]
    assert [c["name"] for c in data["gradients"]["1"]["checks"]] == ["gradcheck", "gradgradcheck"]
    status, out, _ = run(capsys, "check", "--model", "test_cli_tools:tiny_model", "--input", "1,3,4,4",
                         "--whole-model")
    assert status == 0 and "(model)" in out and "(1, 3, 4, 4)" in out


def test_check_fails_and_names_the_module(capsys):
    status, out, _ = run(capsys, "check", "--model", "test_cli_tools:cancelling_model", "--input", "1,3,2,2")
    assert status == 1
    assert "no attention modules" in out and "first non-finite output under autocast: 2 (Cancel)" in out


def test_json_reports_are_strict_json_even_with_infinities(capsys):
    """A float error can be infinite (a zero reference) or NaN; JSON has no such numbers."""
    from argparse import Namespace

    from cbam.cli.model_spec import print_report

    data = {"rel_error": float("inf"), "rows": [{"error": float("nan")}, (1.5, float("-inf"))], "ok": False}
    print_report(Namespace(json=True), "text", data)

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    assert json.loads(capsys.readouterr().out, parse_constant=refuse) == {
        "rel_error": "inf", "rows": [{"error": "nan"}, [1.5, "-inf"]], "ok": False}


def test_profile_text_and_json(capsys):
    status, out, _ = run(capsys, "profile", *SMALL, "--depth", "1", "--benchmark", "--warmup", "0",
                         "--repeats", "1")
    assert status == 0 and "multiply-adds" in out and "layer4" in out and "layer4.0" not in out
    assert "train step ms" in out
    status, out, _ = run(capsys, "profile", *SMALL, "--attention", "none", "--json")
    data = json.loads(out)
    assert status == 0 and data["cost"]["attention_flops"] == 0 and "benchmark" not in data


@pytest.mark.parametrize("command", ["trace", "check", "profile"])
@pytest.mark.parametrize("argv, message", [
    (["--input", "1,3,x"], "argument --input: expected comma-separated sizes"),
    (["--input", "3,64"], "expected at least 3 positive sizes"),
    (["--input", "0,3,64,64"], "expected at least 3 positive sizes"),
    (["--model", "no_such_module:factory"], "cannot load the factory"),
    (["--model", "vgg16"], "--model must be one of resnet18"),
    (["--device", "tpu9"], "--device expects a torch device"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, command, argv, message):
    status, out, err = run_or_exit(capsys, command, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_numbers_and_shapes_are_one_line_too(capsys):
    for argv in (["profile", *SMALL, "--depth", "-1"], ["profile", *SMALL, "--benchmark", "--repeats", "0"],
                 ["profile", *SMALL, "--repeats", "-5"], ["profile", *SMALL, "--warmup", "-1"],
                 ["profile", "--model", "resnet18", "--input", "1,4,64,64"],
                 ["check", "--model", "resnet18", "--input", "1,4,64,64"]):
        status, out, err = run_or_exit(capsys, *argv)
        assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, argv


@pytest.mark.parametrize("argv, message", [
    (["trace", *SMALL, "--seed", "99999999999999999999"], "argument --seed: expected an int from 0 to 4294967295"),
    (["train", "--out", "unused", "--seed", "1099511627776"], "argument --seed: expected an int from 0 to 4294967295"),
    (["demo", "--seed", "4294967296"], "argument --seed: expected an int from 0 to 4294967295"),
    (["eval", "--checkpoint", "unused.pt", "--batch-size", "99999999999999999999"],
     "argument --batch-size: expected an int from 1 to 2147483647"),
    (["train", "--out", "unused", "--batch-size", "0"], "argument --batch-size: expected an int from 1 to 2147483647"),
    (["train", "--out", "unused", "--image-size", "99999999999999999999"],
     "argument --image-size: expected an int from 1 to 4096"),
    (["eval", "--checkpoint", "unused.pt", "--image-size", "0"],
     "argument --image-size: expected an int from 1 to 4096"),
    (["train", "--out", "unused", "--workers", "99999999999999999999"],
     "argument --workers: expected an int from 0 to 256"),
])
def test_numbers_out_of_range_name_the_option(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.chdir(tmp_path)  # where a command that wrongly went ahead would write
    status, out, err = run_or_exit(capsys, *argv)
    assert status == 2 and out == "" and err == f"cbam {argv[0]}: error: {message}, got {argv[-1]!r}\n"


@pytest.mark.parametrize("source, model, message", [
    ("def broken():\n    raise KeyError('boom')\n", "broken", "the factory raised KeyError: 'boom'"),
    ("1 / 0\n", "anything", "cannot load the factory (ZeroDivisionError: division by zero)"),
])
def test_a_factory_that_raises_is_one_line(capsys, monkeypatch, tmp_path, source, model, message):
    (tmp_path / f"user_models_{model}.py").write_text(source)
    monkeypatch.syspath_prepend(tmp_path)
    spec = f"user_models_{model}:{model}"
    status, out, err = run_or_exit(capsys, "trace", "--model", spec)
    assert status == 2 and out == "" and err == f"cbam trace: error: --model {spec!r}: {message}\n"


def test_stem_builds_the_cifar_stem(capsys):
    status, out, _ = run(capsys, "trace", "--model", "resnet18", "--stem", "cifar", "--input", "1,3,32,32", "--json")
    conv1 = next(row for row in json.loads(out)["rows"] if row["path"] == "conv1")
    assert status == 0 and conv1["outputs"] == [[1, 64, 32, 32]]  # 3x3 stride 1: no downsampling


def run_or_exit(capsys, *argv):
    """``main`` turns errors into status 2; argparse exits with it (SystemExit)."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_python_dash_m_cbam_profile():
    result = subprocess.run(
        [sys.executable, "-m", "cbam", "profile", "--model", "resnet18", "--input", "1,3,32,32", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["cost"]
    assert report["params"] == 11_777_336 and 0 < report["attention_flops"] < report["flops"]


@pytest.mark.parametrize("command", ["check", "profile"])
def test_any_error_of_a_user_model_is_one_line_naming_it_and_where(capsys, command):
    status, out, err = run(capsys, command, "--model", "test_cli_tools:raising_model", "--input", "1,3,8,8")
    assert status == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cbam {command}: error: KeyError: 'inside forward' (at ")
    assert err.rstrip().endswith(f"test_cli_tools.py:{Raises.forward.__code__.co_firstlineno + 2})")


def test_a_ctrl_c_that_torch_turned_into_an_error_is_an_interruption(capsys):
    status, out, err = run(capsys, "check", "--model", "test_cli_tools:interrupted_model", "--input", "1,3,8,8")
    assert status == 130 and err == "cbam check: interrupted\n"


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("where", ["out", "parent"])
def test_an_out_folder_that_is_a_file_is_refused_first(capsys, tmp_path, command, where):
    """``--out`` naming a file (or a folder under one): one line before any training, the file untouched."""
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    out = user_file if where == "out" else user_file / "run"
    status, printed, err = run(capsys, command, "--out", str(out), *(["--quick"] if command == "demo" else []))
    assert status == 2 and printed == "" and user_file.read_text() == "mine"
    assert err == f"cbam {command}: error: cannot write into folder {str(out)!r}: {str(user_file)!r} is a file\n"
