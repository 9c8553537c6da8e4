"""``cbam eval``: a ``cbam train`` checkpoint's test accuracy, confusion matrix and pointing game."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..tables import format_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a cbam train checkpoint",
        description="Evaluate a checkpoint written by `cbam train` on a test split: accuracy, a confusion-matrix "
                    "figure, and on synthetic data the pointing game of every CBAM's spatial attention against "
                    "the object boxes. Checkpoints load with weights_only=True.",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="OUT/checkpoint.pt of a cbam train run")
    parser.add_argument("--data", default=None, help="test data (default: the data the checkpoint was trained on)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None,
                        help="confusion-matrix figure (default confusion.png beside the checkpoint)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import build_model, load_split, predict, read_checkpoint
    from ..train.checkpoint import load_state
    from ..train.loop import FORMAT
    from ..train.metrics import confusion_figure, confusion_matrix
    from ..validation import check_int
    from ..viz import figure_format, save_figure

    batch_size = check_int("--batch-size", args.batch_size)
    out = args.out if args.out is not None else args.checkpoint.parent / "confusion.png"
    figure_format(out)
    checkpoint = read_checkpoint(args.checkpoint)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(args.checkpoint)!r} was not written by cbam train (no {FORMAT!r} format "
                         f"tag); for bare weights use cbam visualize --checkpoint")
    config, classes = checkpoint["config"], tuple(checkpoint["classes"])
    model = build_model(config, len(classes))
    load_state(model, checkpoint["model"], args.checkpoint)
    data = args.data or config["data"]
    split = load_split(data, False, image_size=config["image_size"])
    if split.classes != classes:
        raise ValueError(f"--data {data}: its classes {list(split.classes)} differ from the checkpoint's "
                         f"{list(classes)}")
    result = predict(model, split, batch_size)
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
                          "figure": str(path)}, indent=2))
        return 0
    print(f"{data}: accuracy {result.accuracy:.2%} on {len(result.labels)} test images; wrote {path}")
    if pointing:
        print("\npointing game (the spatial gate's peak inside the object's box):")
        print(format_table(["CBAM layer", "map", "pointing game", "chance"],
                           [[name, "x".join(map(str, p["map_size"])), f"{p['accuracy']:.1%}", f"{p['chance']:.1%}"]
                            for name, p in pointing.items()], align="lrrr"))
    return 0
