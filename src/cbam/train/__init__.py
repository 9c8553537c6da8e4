"""Training and evaluation: datasets, the loop (one process or ``torchrun``), checkpoints, metrics, the demo.

- ``load_split(spec, train)``: ``synthetic``, ``cifar10:PATH``, ``imagefolder:PATH`` (``data``)
- ``make_synthetic(count, seed)``: the generated images with their object boxes (``synthetic``)
- ``train(TrainConfig(...))``: SGD/AdamW, cosine schedule, DDP under ``torchrun`` (``loop``, ``distributed``)
- ``model_for(settings, num_classes)``: the model a run's settings (a checkpoint's ``config``) name (``loop``)
- ``save_checkpoint``/``read_checkpoint``/``load_checkpoint``: atomic writes, weights-only reads (``checkpoint``)
- ``predict(model, split)``: predictions and the pointing game of every CBAM (``inference``)
- ``run_demo(out)``: ResNet-18 with and without CBAM, compared (``demo``)
"""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .data import Split, load_split
from .demo import run_demo
from .inference import Predictions, predict
from .loop import TrainConfig, TrainResult, model_for, train
from .synthetic import SHAPES, make_synthetic

__all__ = [
    "SHAPES", "Predictions", "Split", "TrainConfig", "TrainResult", "load_checkpoint", "load_split", "make_synthetic",
    "model_for", "predict", "read_checkpoint", "run_demo", "save_checkpoint", "train",
]
