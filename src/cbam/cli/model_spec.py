"""The model and input arguments shared by subcommands: ``--model``, ``--attention``, ``--input``."""

from __future__ import annotations

import argparse
import importlib

from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ATTENTIONS = ("cbam", "none")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18",
                        help=f"one of {', '.join(RESNETS)}, or pkg.module:factory for your own model")
    parser.add_argument("--attention", default="cbam", choices=ATTENTIONS, help="CBAM in every block, or none")
    parser.add_argument("--preset", default=None, choices=("paper", "timm", "official"), help="CBAM preset")
    parser.add_argument("--num-classes", type=int, default=1000)


def build_model(args: argparse.Namespace) -> nn.Module:
    """A built-in ResNet, or whatever ``pkg.module:factory`` returns when called with no arguments."""
    if args.model in RESNETS:
        from .. import models

        attention = None if args.attention == "none" else args.attention
        return getattr(models, args.model)(num_classes=args.num_classes, attention=attention, preset=args.preset)
    module_name, _, factory_name = args.model.partition(":")
    if not factory_name:
        raise ValueError(f"--model must be one of {', '.join(RESNETS)} or pkg.module:factory, got {args.model!r}")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {args.model!r}: cannot load the factory ({error})") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {args.model!r} should return an nn.Module, got {type(model).__name__}")
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,224,224"`` -> ``(2, 3, 224, 224)``; every size a positive int, at least 3 of them."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 2,3,224,224, got {text!r}") from None
    if len(shape) < 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected at least 3 positive sizes (B,C,...), got {text!r}")
    return shape
