"""Training and evaluation: datasets, the loop (one process or ``torchrun``), checkpoints, metrics, the demo.

- ``load_split(spec, train)``: ``synthetic``, ``cifar10:PATH``, ``imagefolder:PATH`` (``data``)
- ``make_synthetic(count, seed)``: the generated images with their object boxes (``synthetic``)
- ``train(TrainConfig(...))``: SGD/AdamW, cosine schedule, DDP under ``torchrun`` (``loop``, ``distributed``)
- ``save_checkpoint``/``read_checkpoint``/``load_checkpoint``: atomic writes, weights-only reads (``checkpoint``)
- ``predict(model, split)``: predictions and the pointing game of every CBAM (``inference``)
- ``run_demo(out)``: ResNet-18 with and without CBAM, compared (``demo``)
"""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .data import Split, load_split
from .demo import run_demo
from .inference import Predictions, predict
from .loop import TrainConfig, TrainResult, build_model, train
from .synthetic import SHAPES, make_synthetic

__all__ = [
    "SHAPES", "Predictions", "Split", "TrainConfig", "TrainResult", "build_model", "load_checkpoint", "load_split",
    "make_synthetic", "predict", "read_checkpoint", "run_demo", "save_checkpoint", "train",
]
