"""``cbam eval``: a checkpoint's test accuracy, confusion matrix and pointing game.

A ``cbam train`` checkpoint names its model and data; any other checkpoint ``cbam.convert.load_weights``
reads (official, timm, torchvision, safetensors) is evaluated with ``--model`` and ``--data``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..tables import format_table
from .model_spec import (
    MAX_BATCH,
    MAX_IMAGE_SIDE,
    add_model_arguments,
    add_prefix_argument,
    int_range,
    model_from_args,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint",
        description="Evaluate a checkpoint written by `cbam train` (or, with --model and --data, any checkpoint "
                    "cbam convert reads) on a test split: accuracy, a confusion-matrix figure, and on synthetic "
                    "data the pointing game of every CBAM's spatial attention against the object boxes. "
                    "Checkpoints load with weights_only=True.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="OUT/checkpoint.pt of a cbam train run, or other weights with --model and --data")
    add_model_arguments(parser)
    parser.set_defaults(model=None, num_classes=None)
    add_prefix_argument(parser)
    parser.add_argument("--data", default=None, help="test data (default: the data the checkpoint was trained on)")
    parser.add_argument("--image-size", type=int_range(1, MAX_IMAGE_SIDE), default=64,
                        help="side of imagefolder images with --model")
    parser.add_argument("--batch-size", type=int_range(1, MAX_BATCH), default=128)
    parser.add_argument("--out", type=Path, default=None,
                        help="confusion-matrix figure (default confusion.png beside the checkpoint)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_destination
    from ..convert import load_weights
    from ..train import load_split, model_for, predict, read_checkpoint
    from ..train.checkpoint import FORMAT, check_run_checkpoint, is_run_checkpoint
    from ..train.metrics import confusion_figure, confusion_matrix
    from ..viz import figure_format, save_figure

    out = args.out if args.out is not None else args.checkpoint.parent / "confusion.png"
    figure_format(out)
    checkpoint = read_checkpoint(args.checkpoint)
    check_destination(out, inputs=(args.checkpoint,))  # before the evaluation, not after
    source = f"checkpoint {str(args.checkpoint)!r}"
    if is_run_checkpoint(checkpoint):
        check_run_checkpoint(checkpoint, args.checkpoint)
        config, classes = checkpoint["config"], tuple(checkpoint["classes"])
        model = model_for(config, len(classes))
        report = load_weights(checkpoint["model"], model, prefix=args.prefix, allow_missing_attention=False,
                              source_name=source)
        data = args.data or config["data"]
        split = load_split(data, False, image_size=config["image_size"])
    else:
        if args.model is None or args.data is None:
            raise ValueError(f"{source} was not written by cbam train (no {FORMAT!r} format tag): name its model "
                             f"and test data with --model and --data")
        data = args.data
        split = load_split(data, False, image_size=args.image_size)
        classes = split.classes
        if args.num_classes not in (None, len(classes)):
            raise ValueError(f"--num-classes {args.num_classes}: --data {data} has {len(classes)} classes, and the "
                             f"model's outputs must be its classes")
        args.num_classes = len(classes)
        model = model_from_args(args)
        report = load_weights(checkpoint, model, prefix=args.prefix, allow_missing_attention=False,
                              source_name=source)
    if split.classes != classes:
        raise ValueError(f"--data {data}: its classes {list(split.classes)} differ from the checkpoint's "
                         f"{list(classes)}")
    result = predict(model, split, args.batch_size)
    matrix = confusion_matrix(result.predictions, result.labels, len(classes))
    try:
        path = save_figure(confusion_figure(matrix, classes), out, dpi=100)
    except ImportError as error:
        raise RuntimeError(str(error)) from None
    pointing = {name: {"accuracy": p.accuracy, "chance": p.chance, "map_size": list(p.map_size)}
                for name, p in result.pointing.items()}
    if args.json:
        print(json.dumps({"data": data, "images": len(result.labels), "accuracy": result.accuracy,
                          "confusion_matrix": matrix.tolist(), "classes": list(classes), "pointing_game": pointing,
                          "figure": str(path), "weights": str(report)}, indent=2))
        return 0
    print(report)
    print(f"{data}: accuracy {result.accuracy:.2%} on {len(result.labels)} test images; wrote {path}")
    if pointing:
        print("\npointing game (the spatial gate's peak inside the object's box):")
        print(format_table(["CBAM layer", "map", "pointing game", "chance"],
                           [[name, "x".join(map(str, p["map_size"])), f"{p['accuracy']:.1%}", f"{p['chance']:.1%}"]
                            for name, p in pointing.items()], align="lrrr"))
    return 0
