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
])
def test_bad_arguments(tmp_path, capsys, args, message):
    assert train(tmp_path, *args) == 2
    assert message in capsys.readouterr().err


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
