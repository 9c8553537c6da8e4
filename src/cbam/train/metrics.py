"""Per-epoch metrics as JSON and CSV, the training-curve and confusion-matrix figures."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_text_atomic

EPOCH_FIELDS = ("epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_seconds",
                "images_per_second")


def _finite_or_null(row: Mapping[str, float]) -> dict:
    """``row`` with NaN and infinities as ``None``: strict JSON (``NaN`` is not JSON; a diverged run has it)."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in row.items()}


def write_metrics(out: Path, history: Sequence[Mapping[str, float]], extra: Mapping) -> None:
    """``out/metrics.json`` (``extra`` plus ``epochs``: ``history``, non-finite values as ``null``) and
    ``out/metrics.csv`` (one row an epoch)."""
    epochs = [_finite_or_null(row) for row in history]
    write_text_atomic(out / "metrics.json", json.dumps({**extra, "epochs": epochs}, indent=2, allow_nan=False) + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=EPOCH_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(out / "metrics.csv", text.getvalue())


def curves_figure(runs: Mapping[str, Sequence[Mapping[str, float]]]):
    """Loss and accuracy against epoch, training dashed and test solid, one colour per run in ``runs``."""
    from ..viz.extras import require

    ticker = require("matplotlib.ticker")
    figure = require("matplotlib.figure").Figure(figsize=(9, 3.4), layout="constrained")
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    for colour, (name, history) in enumerate(runs.items()):
        epochs = [row["epoch"] for row in history]
        for ax, key in ((loss_ax, "loss"), (accuracy_ax, "accuracy")):
            ax.plot(epochs, [row[f"train_{key}"] for row in history], "--", color=f"C{colour}", label=f"{name} train")
            ax.plot(epochs, [row[f"test_{key}"] for row in history], "-o", color=f"C{colour}", label=f"{name} test")
    for ax, title in ((loss_ax, "cross-entropy"), (accuracy_ax, "accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    accuracy_ax.set_ylim(0, 1)
    accuracy_ax.legend(fontsize=7)
    return figure


def confusion_matrix(predictions: Tensor, labels: Tensor, classes: int) -> Tensor:
    """``(classes, classes)`` int64 counts: row = true class, column = predicted class."""
    return torch.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def confusion_figure(matrix: Tensor, classes: Sequence[str]):
    """The confusion matrix, rows normalised to the share of each true class, counts written in the cells."""
    from ..viz.extras import require

    size = 2 + 0.45 * len(classes)
    figure = require("matplotlib.figure").Figure(figsize=(size + 1, size), layout="constrained")
    ax = figure.subplots()
    shares = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 20:
        for row in range(len(classes)):
            for col in range(len(classes)):
                ax.text(col, row, int(matrix[row, col]), ha="center", va="center", fontsize=7,
                        color="white" if shares[row, col] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    figure.colorbar(image, ax=ax, label="share of the true class")
    return figure
