"""``predict``: a model's predictions on a split and, where the split has object boxes, where its CBAMs look."""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..viz import capture_attention, is_cbam_module, pointing_game
from .data import Split


class Pointing(NamedTuple):
    """One CBAM layer's pointing game over a split: ``hits (N,)`` bool, ``accuracy``, ``chance`` (the boxes' share)."""

    hits: Tensor
    accuracy: float
    chance: float
    map_size: tuple[int, int]


class Predictions(NamedTuple):
    """``predictions``, ``labels``: ``(N,)`` int64; ``pointing``: CBAM layer name -> ``Pointing`` (empty: no boxes)."""

    predictions: Tensor
    labels: Tensor
    pointing: dict[str, Pointing]

    @property
    def accuracy(self) -> float:
        return (self.predictions == self.labels).double().mean().item()


def predict(model: nn.Module, split: Split, batch_size: int = 128, device="cpu") -> Predictions:
    """Run ``model`` (in eval mode, each module's mode restored after) over ``split``; score each CBAM's spatial
    gate on ``split.boxes`` if known."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        return _predict(model, split, batch_size, device)
    finally:
        for module, training in modes:
            module.training = training


def _predict(model: nn.Module, split: Split, batch_size: int, device) -> Predictions:
    loader = DataLoader(split.dataset, batch_size=batch_size)
    score = split.boxes is not None and any(is_cbam_module(module) for module in model.modules())
    predictions, labels, hits, sizes = [], [], {}, {}
    start = 0
    with torch.no_grad(), (capture_attention(model) if score else nullcontext({})) as records:
        for x, y in loader:
            predictions.append(model(x.to(device)).argmax(1).cpu())
            labels.append(y)
            for name, record in records.items():
                boxes = split.boxes[start:start + len(y)]
                hits.setdefault(name, []).append(pointing_game(record.spatial, boxes, split.image_size).hits)
                sizes[name] = tuple(record.spatial.shape[-2:])
            start += len(y)
    pointing = {}
    if score:
        boxes = split.boxes.double()
        chance = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).mean().item() / split.image_size ** 2
        for name, parts in hits.items():
            layer_hits = torch.cat(parts)
            pointing[name] = Pointing(layer_hits, layer_hits.double().mean().item(), chance, sizes[name])
    return Predictions(torch.cat(predictions), torch.cat(labels), pointing)
