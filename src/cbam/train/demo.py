"""``run_demo``: train the same small ResNet with and without CBAM on the synthetic data, then compare them.

Both runs share everything but the attention: data, seed (so the non-CBAM weights start equal),
order of batches, optimizer, schedule and budget. The report holds each model's parameters and
FLOPs (``cbam.profile.cost`` on one 64x64 image), training time, test accuracy, CBAM's time
overhead, and the pointing game of every CBAM's spatial gate on the test images' object boxes
against chance. Outputs in ``out``: ``plain/`` and ``cbam/`` (each run's checkpoint and metrics;
an interrupted demo resumes), ``demo.json``, ``curves.png`` and ``attention_*.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from ..atomic import check_folder, write_text_atomic
from ..ops import calibration
from ..ops.engines.cpp import engine
from ..profile import cost
from ..tables import format_count, format_table
from .data import load_split
from .inference import Pointing, predict
from .loop import ChangedSettings, TrainConfig, model_for, train
from .metrics import curves_figure

FULL = {"data": "synthetic:4000,1000", "epochs": 2, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3}
QUICK = {"data": "synthetic:96,48", "epochs": 1, "batch_size": 32, "optimizer": "adamw", "lr": 2e-3}
RUNS = {"plain": "none", "cbam": "cbam"}  # output folder -> --attention
FIGURE_IMAGES = 4


class DemoReport(NamedTuple):
    """What ``run_demo`` measured; ``summary`` is ``demo.json``'s content, ``text`` the printed tables."""

    summary: dict
    text: str


def _table(summary: dict) -> str:
    plain, attended = summary["runs"]["plain"], summary["runs"]["cbam"]
    pointing = summary["pointing_game"]
    mean = sum(layer["accuracy"] for layer in pointing.values()) / len(pointing)
    chance = next(iter(pointing.values()))["chance"]
    rows = [
        ["parameters", format_count(plain["params"]), format_count(attended["params"])],
        ["FLOPs (1 image)", format_count(plain["flops"]), format_count(attended["flops"])],
        ["training time", f"{plain['train_seconds']:.1f} s", f"{attended['train_seconds']:.1f} s"],
        ["CBAM time overhead", "", f"{summary['time_overhead']:+.1%}"],
        ["test accuracy", f"{plain['test_accuracy']:.1%}", f"{attended['test_accuracy']:.1%}"],
        ["pointing game, mean of CBAM layers", "", f"{mean:.1%} (chance {chance:.1%})"],
    ]
    main = format_table(["", "ResNet-18", "ResNet-18 + CBAM"], rows, align="lrr")
    layers = format_table(
        ["CBAM layer", "map", "pointing game", "chance"],
        [[name, "x".join(map(str, layer["map_size"])), f"{layer['accuracy']:.1%}", f"{layer['chance']:.1%}"]
         for name, layer in pointing.items()],
        align="lrrr",
    )
    return f"{main}\n\nwhere each CBAM's spatial gate peaks on the test images (inside the object's box):\n{layers}"


def _pointing_summary(pointing: dict[str, Pointing]) -> dict:
    return {name: {"accuracy": p.accuracy, "chance": p.chance, "map_size": list(p.map_size)}
            for name, p in pointing.items()}


def _write_figures(out: Path, histories: dict, model, split) -> None:
    from ..viz import attention_figure, capture_attention, save_figure

    save_figure(curves_figure(histories), out / "curves.png", dpi=100)
    count = min(FIGURE_IMAGES, len(split.dataset))
    batch = torch.stack([split.dataset[index][0] for index in range(count)])
    with capture_attention(model) as records, torch.no_grad():
        model(batch)
    for index in range(count):
        pixels = split.dataset.pixels[index].float() / 255
        figure = attention_figure(pixels, records, index=index, columns=5)
        save_figure(figure, out / f"attention_{index}.png", dpi=80)


def _calibrate(config: TrainConfig, classes: int, image_size: int) -> None:
    """One training step of a throwaway model built as the run builds it: ``impl="auto"`` times its two paths
    once per call shape on this machine (``cbam.ops.calibration``, cached for the process), here rather than
    inside the timed run, where it would count as CBAM's overhead (most of it with ``--quick``'s 3 steps)."""
    with torch.random.fork_rng():
        model = model_for(config.run_settings(), classes)
        model(torch.randn(config.batch_size, 3, image_size, image_size)).sum().backward()


def run_demo(out, *, quick: bool = False, seed: int = 0, progress: bool = True,
             log: Callable[[str], None] = print) -> DemoReport:
    """Train both models (``QUICK``'s tiny budget with ``quick``, else ``FULL``), compare, write ``out``."""
    out = check_folder(out)  # before minutes of training
    settings = QUICK if quick else FULL
    results, summary = {}, {"settings": {**settings, "model": "resnet18", "stem": "imagenet", "seed": seed},
                            "runs": {}}
    engine()  # the fused CPU kernels are built on first use (about 30 s, once a machine): not inside a timed run
    train_split = load_split(settings["data"], True)
    for folder, attention in RUNS.items():
        log(f"training ResNet-18 {'with' if attention == 'cbam' else 'without'} CBAM ({settings['data']}, "
            f"{settings['epochs']} epoch{'s' if settings['epochs'] > 1 else ''})")
        config = TrainConfig(out=str(out / folder), attention=attention, seed=seed, resume=True, progress=progress,
                             **settings)
        if calibration.enabled():
            _calibrate(config, len(train_split.classes), train_split.image_size)
        try:
            result = train(config, log=log)
        except ChangedSettings as error:  # an earlier demo in out, with another --quick or --seed
            raise ValueError(f"{str(out)!r} holds a demo run with other settings ({', '.join(error.changes)}): "
                             f"pass another --out (or the same --quick and --seed), or remove it") from None
        report = cost(result.model, torch.zeros(1, 3, 64, 64))
        results[folder] = result
        summary["runs"][folder] = {
            "params": report.params, "flops": report.flops, "attention_flops": report.attention_flops,
            "train_seconds": sum(row["train_seconds"] for row in result.history),
            "test_accuracy": result.history[-1]["test_accuracy"], "history": result.history,
        }
    runs = summary["runs"]
    summary["time_overhead"] = runs["cbam"]["train_seconds"] / runs["plain"]["train_seconds"] - 1
    test_split = load_split(settings["data"], False)
    predictions = predict(results["cbam"].model, test_split)
    summary["pointing_game"] = _pointing_summary(predictions.pointing)
    write_text_atomic(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    try:
        _write_figures(out, {"plain": runs["plain"]["history"], "CBAM": runs["cbam"]["history"]},
                       results["cbam"].model, test_split)
    except ImportError as error:  # the viz extra is optional; the numbers are in demo.json
        log(f"no figures: {error}")
    return DemoReport(summary, _table(summary))
