"""``cbam train``/``cbam eval``: outputs, bitwise resume on the CPU, refusals, evaluation against a hand count."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cbam
from cbam.cli import main
from cbam.train import load_split, model_for, read_checkpoint

torch.set_num_threads(2)

ARGS = ["--data", "synthetic:48,24", "--batch-size", "16", "--epochs", "2", "--seed", "3", "--no-progress"]
TIMING = ("train_seconds", "images_per_second")


def train(out, *extra):
    return main(["train", *ARGS, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert train(out) == 0
    return out


def assert_same_run(a, b):
    assert a["epoch"] == b["epoch"] and a["config"] == b["config"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and torch.equal(a["rng"], b["rng"])
    strip = [{k: v for k, v in row.items() if k not in TIMING} for row in a["history"]]
    assert strip == [{k: v for k, v in row.items() if k not in TIMING} for row in b["history"]]


def test_outputs(full):
    checkpoint = read_checkpoint(full / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["classes"][0] == "disk"
    metrics = json.loads((full / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2] and metrics["config"]["lr"] == 0.05
    assert metrics["epochs"][1]["lr"] < metrics["epochs"][0]["lr"] == 0.05  # cosine, from the peak
    with open(full / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [float(row["test_accuracy"]) for row in rows] == [row["test_accuracy"] for row in metrics["epochs"]]
    assert (full / "curves.png").stat().st_size > 1000
    assert not [p for p in full.iterdir() if p.name.endswith(".tmp")]


def test_stop_and_resume_equals_one_run(full, tmp_path, capsys):
    assert train(tmp_path, "--stop-after", "1") == 0
    assert read_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert train(tmp_path, "--resume") == 0
    assert "resuming" in capsys.readouterr().out
    assert_same_run(read_checkpoint(full / "checkpoint.pt"), read_checkpoint(tmp_path / "checkpoint.pt"))


def test_sigkill_then_resume_equals_one_run(full, tmp_path):
    """Kill a training process (SIGKILL) as soon as its first checkpoint exists, maybe during the second
    epoch's save; ``--resume`` continues from the last complete checkpoint."""
    command = [sys.executable, "-m", "cbam", "train", *ARGS, "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (tmp_path / "checkpoint.pt").exists()
    assert train(tmp_path, "--resume") == 0
    assert_same_run(read_checkpoint(full / "checkpoint.pt"), read_checkpoint(tmp_path / "checkpoint.pt"))


@pytest.mark.parametrize("extra, message", [
    ([], "checkpoint.pt' exists: pass --resume"),
    (["--resume", "--lr", "0.1"], r"--resume must keep the run's settings; changed: lr 0.05 -> 0.1"),
])
def test_refusals_on_an_existing_run(full, capsys, extra, message):
    assert train(full, *extra) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("cbam train: error: ")
    assert message in error


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "64"], "--batch-size 64 is larger than the 48 training images"),
    (["--attention", "none", "--preset", "timm"], "takes no --preset"),
    (["--data", "cifar10"], "--data must be synthetic"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--dist-timeout", "0"], "--dist-timeout must be a positive number of seconds below 86400000000000, got 0.0"),
    (["--dist-timeout", "nan"], "--dist-timeout must be a positive number of seconds below 86400000000000, got nan"),
    (["--dist-timeout", "1e308"], "below 86400000000000, got 1e+308"),  # more than timedelta holds
])
def test_bad_arguments(tmp_path, capsys, args, message):
    assert train(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written; the folder, which existed, is kept


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys):
    assert train(tmp_path / "a" / "b", "--init-from", str(tmp_path / "none.pt")) == 2
    assert "none.pt' does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _crafted(full, directory, change) -> str:
    """``full``'s checkpoint with ``change(checkpoint)`` applied, as ``directory/checkpoint.pt``."""
    checkpoint = read_checkpoint(full / "checkpoint.pt")
    change(checkpoint)
    directory.mkdir(exist_ok=True)
    torch.save(checkpoint, directory / "checkpoint.pt")
    return str(directory / "checkpoint.pt")


TAGGED = "is a cbam-train-1 checkpoint but"
FOR_EVAL = {  # a change to a checkpoint -> the refusal
    "no config": (lambda c: c.pop("config"), "has no 'config' entry; expected a dict of the run's settings"),
    "no classes": (lambda c: c.pop("classes"), "has no 'classes' entry; expected a non-empty list of class "
                                              "names (str)"),
    "no stem": (lambda c: c["config"].pop("stem"), "its 'config' entry has no 'stem' setting"),
    "config a str": (lambda c: c.update(config="x"),
                     "its 'config' entry should be a dict of the run's settings, got str 'x'"),
    "classes an int": (lambda c: c.update(classes=5), "its 'classes' entry should be a non-empty list of class "
                                                      "names (str), got int 5"),
    "data an int": (lambda c: c["config"].update(data=5), "its config's 'data' should be str, got int 5"),
    "unknown model": (lambda c: c["config"].update(model="resnet19"),
                      "its config's 'model' should be one of 'resnet18', 'resnet34', 'resnet50', 'resnet101', "
                      "'resnet152', got str 'resnet19'"),
    "unknown preset": (lambda c: c["config"].update(preset="keras"),
                       "its config's 'preset' should be one of None, 'paper', 'seed', 'timm', 'official', got str "
                       "'keras'"),
    "model a str": (lambda c: c.update(model="x"), "its 'model' entry should be a state dict, a dict of str -> "
                                                   "tensor, got str 'x'"),
}
FOR_RESUME = {
    "no optimizer": (lambda c: c.pop("optimizer"), "has no 'optimizer' entry; expected a dict, the "
                                                     "optimizer's state_dict()"),
    "no scaler": (lambda c: c.pop("scaler"), "has no 'scaler' entry; expected a dict, the grad scaler's "
                                               "state_dict()"),
    "history an int": (lambda c: c.update(history=5), "its 'history' entry should be a list of dicts, one per epoch, "
                                                      "got int 5"),
    "rng of floats": (lambda c: c.update(rng=torch.zeros(3)), "its 'rng' entry should be a uint8 tensor, "
                                                                "torch.get_rng_state(), got a torch.float32 tensor "
                                                                "of shape (3,)"),
}


@pytest.mark.parametrize("case", FOR_EVAL)
def test_eval_refuses_a_corrupt_checkpoint_in_one_line(full, tmp_path, capsys, case):
    change, message = FOR_EVAL[case]
    path = _crafted(full, tmp_path, change)
    assert main(["eval", "--checkpoint", path]) == 2
    assert capsys.readouterr().err == f"cbam eval: error: checkpoint {path!r} {TAGGED} {message}\n"


@pytest.mark.parametrize("case", [*FOR_EVAL, *FOR_RESUME])
def test_resume_refuses_a_corrupt_checkpoint_in_one_line(full, tmp_path, capsys, case):
    change, message = {**FOR_EVAL, **FOR_RESUME}[case]
    path = _crafted(full, tmp_path, change)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert train(tmp_path, "--resume") == 2
    assert capsys.readouterr().err == f"cbam train: error: checkpoint {path!r} {TAGGED} {message}\n"
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_a_path_under_model_is_never_followed(full, tmp_path, capsys):
    """A checkpoint whose "model" names another checkpoint file is refused; that file is not loaded."""
    path = _crafted(full, tmp_path, lambda c: c.update(model=str(full / "checkpoint.pt")))
    assert main(["eval", "--checkpoint", path]) == 2
    assert "its 'model' entry should be a state dict, a dict of str -> tensor, got str " in capsys.readouterr().err


def test_resume_refuses_an_optimizer_state_of_another_run(full, tmp_path, capsys):
    path = _crafted(full, tmp_path, lambda c: c["optimizer"].update(param_groups=[]))
    assert train(tmp_path, "--resume") == 2
    assert capsys.readouterr().err == (f"cbam train: error: checkpoint {path!r}: its 'optimizer' entry does not fit "
                                       f"this run (ValueError: loaded state dict has a different number of "
                                       f"parameter groups)\n")


def test_eval_matches_a_hand_count(full, capsys):
    assert main(["eval", "--checkpoint", str(full / "checkpoint.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    checkpoint = read_checkpoint(full / "checkpoint.pt")
    model = model_for(checkpoint["config"], 10)
    model.load_state_dict(checkpoint["model"])
    split = load_split("synthetic:48,24", False)
    images = torch.stack([split.dataset[i][0] for i in range(24)])
    labels = torch.tensor([split.dataset[i][1] for i in range(24)])
    with torch.no_grad():
        predicted = model.eval()(images).argmax(1)
    assert report["images"] == 24
    assert report["accuracy"] == pytest.approx((predicted == labels).double().mean().item())
    assert report["accuracy"] == pytest.approx(checkpoint["history"][-1]["test_accuracy"])
    matrix = torch.tensor(report["confusion_matrix"])
    assert matrix.sum() == 24 and matrix.diag().sum() == (predicted == labels).sum()
    assert torch.equal(matrix.sum(1), torch.bincount(labels, minlength=10))
    boxes = split.boxes.double()
    chance = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 64 ** 2).mean().item()
    assert len(report["pointing_game"]) == 8
    assert report["pointing_game"]["layer1.0.cbam"]["map_size"] == [16, 16]
    assert report["pointing_game"]["layer4.1.cbam"]["chance"] == pytest.approx(chance)
    assert (full / "confusion.png").stat().st_size > 1000


def test_eval_rebuilds_bare_weights_with_the_cifar_stem(tmp_path, capsys):
    torch.manual_seed(0)
    model = cbam.models.resnet18(10, stem="cifar").eval()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "bare.pt"), "--model", "resnet18", "--stem", "cifar",
                 "--data", "synthetic:48,24", "--json"]) == 0
    split = load_split("synthetic:48,24", False)
    images = torch.stack([split.dataset[i][0] for i in range(24)])
    labels = torch.tensor([split.dataset[i][1] for i in range(24)])
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).double().mean().item()
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(accuracy)


def test_eval_refuses_other_checkpoints(tmp_path, capsys):
    torch.save({"model": {}}, tmp_path / "bare.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "bare.pt")]) == 2
    assert "was not written by cbam train" in capsys.readouterr().err


def test_amp_and_channels_last(tmp_path):
    """bfloat16 autocast on the CPU (CBAM switches to its reference path there) with channels-last tensors."""
    args = ["train", "--data", "synthetic:32,16", "--batch-size", "16", "--epochs", "1", "--no-progress",
            "--amp", "--channels-last", "--out", str(tmp_path)]
    assert main(args) == 0
    row = json.loads((tmp_path / "metrics.json").read_text())["epochs"][0]
    assert 0 < row["train_loss"] < 20 and 0 <= row["test_accuracy"] <= 1
    assert read_checkpoint(tmp_path / "checkpoint.pt")["model"]["conv1.weight"].dtype == torch.float32
