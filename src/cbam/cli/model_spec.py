"""The model and input arguments shared by subcommands: ``--model``, ``--attention``, ``--stem``, ``--input``."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys

import torch
from torch import nn

from ..presets import PRESET_NAMES
from ..resnets import RESNETS

ATTENTIONS = ("cbam", "none")
STEMS = ("imagenet", "cifar")
MAX_SEED = 2**32 - 1
MAX_BATCH = 2**31 - 1
MAX_IMAGE_SIDE = 4096  # --image-size: a larger side takes minutes and gigabytes per image
MAX_WORKERS = 256  # --workers: data-loading processes


def int_range(low: int, high: int):
    """An argparse ``type``: an int from ``low`` to ``high``; else a one-line usage error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an int from {low} to {high}, got {text!r}")
        return value

    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18",
                        help=f"one of {', '.join(RESNETS)}, or pkg.module:factory for your own model")
    parser.add_argument("--attention", default="cbam", choices=ATTENTIONS, help="CBAM in every block, or none")
    add_preset_argument(parser)
    add_stem_argument(parser)
    parser.add_argument("--num-classes", type=int, default=1000)


def add_prefix_argument(parser: argparse.ArgumentParser) -> None:
    """``--prefix``: ``load_weights``'s ``prefix=``."""
    parser.add_argument("--prefix", default=None,
                        help="load only the checkpoint's keys under this prefix, stripped (ema or net of a "
                             "LightningModule holding self.net and self.ema = AveragedModel(net))")


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """``--preset``, one of the names in ``cbam.presets.PRESETS``."""
    parser.add_argument("--preset", default=None, choices=PRESET_NAMES, help="CBAM preset")


def add_stem_argument(parser: argparse.ArgumentParser) -> None:
    """``--stem``: the built-in ResNets' first layers, as ``cbam train --stem`` trained them."""
    parser.add_argument("--stem", default="imagenet", choices=STEMS,
                        help="imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv, for 32x32 images (default imagenet)")


def model_from_args(args: argparse.Namespace) -> nn.Module:
    """``--model``: a built-in ResNet (``cbam.models.build_model``), or whatever ``pkg.module:factory``
    returns when called with no arguments."""
    if args.model in RESNETS:
        from ..models import build_model

        return build_model(args.model, args.num_classes, attention=args.attention, preset=args.preset,
                           stem=args.stem)
    module_name, _, factory_name = args.model.partition(":")
    if not factory_name:
        raise ValueError(f"--model must be one of {', '.join(RESNETS)} or pkg.module:factory, got {args.model!r}")
    try:
        if os.getcwd() not in sys.path:  # as `python -m cbam` would: the installed script lacks the cwd
            sys.path.insert(0, os.getcwd())
        factory = getattr(importlib.import_module(module_name), factory_name)
    except Exception as error:  # ImportError, AttributeError, or whatever the module raises on import
        raise ValueError(f"--model {args.model!r}: cannot load the factory ({_one_line(error)})") from None
    try:
        model = factory()
    except Exception as error:  # the user's code: one line, not a traceback
        raise ValueError(f"--model {args.model!r}: the factory raised {_one_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {args.model!r} should return an nn.Module, got {type(model).__name__}")
    return model


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,224,224"`` -> ``(2, 3, 224, 224)``; every size a positive int, at least 3 of them."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 2,3,224,224, got {text!r}") from None
    if len(shape) < 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected at least 3 positive sizes (B,C,...), got {text!r}")
    return shape


def add_input_arguments(parser: argparse.ArgumentParser, default: str = "1,3,224,224") -> None:
    """``--input B,C,H,W`` (a random tensor), ``--device``, ``--seed`` and ``--json``."""
    parser.add_argument("--input", type=parse_shape, default=parse_shape(default), metavar="B,C,H,W",
                        help=f"input shape, a random tensor (default {default})")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--seed", type=int_range(0, MAX_SEED), default=0,
                        help="seed of the input and the model's initialisation")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def build_model_and_input(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """The model (``model_from_args``, in eval mode, on ``--device``) and a ``randn(--input)`` tensor."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device expects a torch device such as cpu or cuda, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    torch.manual_seed(args.seed)
    model = model_from_args(args).eval().to(device)
    return model, torch.randn(args.input, device=device)


def print_report(args: argparse.Namespace, text: str, data: dict) -> None:
    """``data`` as strict JSON with ``--json`` (infinities and NaN as the strings ``"inf"``, ``"-inf"``,
    ``"nan"``: JSON has no such numbers), else ``text``."""
    print(json.dumps(_named_non_finite(data), indent=2, allow_nan=False) if args.json else text)


def _named_non_finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _named_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_named_non_finite(item) for item in value]
    return value
