"""``cbam demo --quick``: both runs, the table, and numbers checked against independent counts."""

import json

import pytest
import torch

import cbam
from cbam.cli import main
from cbam.train import load_split
from cbam.train.demo import DemoReport

torch.set_num_threads(2)


def test_quick_demo(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "demo.json").read_text())
    plain, attended = summary["runs"]["plain"], summary["runs"]["cbam"]

    for name, attention in (("plain", None), ("cbam", "cbam")):
        model = cbam.models.resnet18(10, attention=attention)
        assert summary["runs"][name]["params"] == sum(p.numel() for p in model.parameters())
    assert attended["flops"] > plain["flops"] and plain["attention_flops"] == 0
    assert summary["time_overhead"] == pytest.approx(attended["train_seconds"] / plain["train_seconds"] - 1)
    assert attended["test_accuracy"] == attended["history"][-1]["test_accuracy"]

    boxes = load_split("synthetic:96,48", False).boxes.double()
    chance = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean().item() / 64 ** 2
    pointing = summary["pointing_game"]
    assert len(pointing) == 8 and all(layer["chance"] == pytest.approx(chance) for layer in pointing.values())
    assert all(round(layer["accuracy"] * 48) == pytest.approx(layer["accuracy"] * 48) for layer in pointing.values())

    for row in ("parameters", "FLOPs (1 image)", "training time", "CBAM time overhead", "test accuracy",
                "pointing game", "layer4.1.cbam"):
        assert row in printed
    assert f"{plain['test_accuracy']:.1%}" in printed
    for name in ("curves.png", "attention_0.png", "attention_3.png", "plain/checkpoint.pt", "cbam/metrics.csv"):
        assert (tmp_path / name).stat().st_size > 100, name

    # a second call resumes both finished runs: same numbers, no training
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "demo.json").read_text())
    assert again["runs"] == summary["runs"] and again["pointing_game"] == summary["pointing_game"]


def test_default_budget():
    """The default demo's workload, which its time in the README follows: two ResNet-18s, each trained on at
    most 8,000 images (images x epochs) and tested on at most 1,000 per epoch."""
    from cbam.train.data import _synthetic_sizes
    from cbam.train.demo import FULL, RUNS

    kind, _, sizes = FULL["data"].partition(":")
    train_images, test_images = _synthetic_sizes(sizes)
    assert kind == "synthetic" and len(RUNS) == 2
    assert train_images * FULL["epochs"] <= 8000 and test_images <= 1000


def test_each_budget_and_seed_has_its_own_default_folder(monkeypatch, capsys, tmp_path):
    """The README's `cbam demo`, `cbam demo --seed 1` and `cbam demo --quick` do not share (and refuse) a folder."""
    monkeypatch.chdir(tmp_path)
    folders = []
    monkeypatch.setattr(cbam.train, "run_demo", lambda out, **options: folders.append(out) or DemoReport({}, ""))
    for options in ([], ["--seed", "1"], ["--quick"], ["--quick", "--seed", "1"], ["--out", "mine", "--seed", "1"]):
        assert main(["demo", *options]) == 0
    assert folders == ["cbam-demo", "cbam-demo-seed1", "cbam-demo-quick", "cbam-demo-quick-seed1", "mine"]
    assert "outputs in cbam-demo-seed1/" in capsys.readouterr().out


def test_a_folder_with_another_demo_is_refused_in_the_demo_s_terms(tmp_path, capsys):
    plain = tmp_path / "plain"
    assert main(["train", "--data", "synthetic:16,8", "--batch-size", "8", "--epochs", "1", "--attention", "none",
                 "--no-progress", "--out", str(plain)]) == 0
    before = {path.name: path.read_bytes() for path in plain.iterdir()}
    capsys.readouterr()
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"cbam demo: error: {str(tmp_path)!r} holds a demo run with other settings (data 'synthetic:16,8' -> "
        f"'synthetic:96,48', batch_size 8 -> 32, optimizer 'sgd' -> 'adamw', lr 0.05 -> 0.002): "
        f"pass another --out (or the same --quick and --seed), or remove it\n")
    assert {path.name: path.read_bytes() for path in plain.iterdir()} == before
