"""``cbam visualize``: draw a model's CBAM attention on an image and write the figure."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..viz.image import MIN_SIDE
from .model_spec import add_model_arguments, model_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "visualize", help="draw CBAM's spatial and channel attention on an image",
        description="Run the model on one image and write a figure: every CBAM's spatial map over the image and "
                    "its channel weights (PNG, SVG or PDF by the --out extension).",
    )
    add_model_arguments(parser)
    parser.add_argument("--checkpoint", type=Path,
                        help="weights in any layout cbam convert reads (cbam, official, timm; .pt or .safetensors), "
                             "converted to the model's")
    parser.add_argument("--image", type=Path, required=True, help="any image Pillow reads")
    parser.add_argument("--size", type=_side, default=224, help="side of the square model input (default 224)")
    parser.add_argument("--layers", nargs="+", metavar="NAME",
                        help="layers to draw, by name or prefix (layer4: layer4.0.cbam, layer4.1.cbam); default all")
    parser.add_argument("--grad-cam", metavar="LAYER",
                        help="add a Grad-CAM panel for this module's output (e.g. layer4)")
    parser.add_argument("--out", type=Path, default=Path("attention.png"), help="figure file (default attention.png)")
    parser.set_defaults(run=run)


def _side(text: str) -> int:
    try:
        side = int(text)
    except ValueError:
        side = 0
    if side < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"expected an int >= {MIN_SIDE}, got {text!r}")
    return side


def run(args: argparse.Namespace) -> int:
    from .. import viz
    from ..convert import load_weights
    from ..viz.extras import require

    try:
        require("matplotlib.figure")
        require("PIL.Image")
    except ImportError as error:  # one line, like every other error here
        raise RuntimeError(str(error)) from None
    viz.figure_format(args.out)
    image = viz.load_image(args.image, args.size)
    model = model_from_args(args).eval()
    if args.checkpoint is not None:  # attention left at initialisation would draw nothing learnt: strict
        print(load_weights(args.checkpoint, model, allow_missing_attention=False))
    heatmaps = {}
    with viz.capture_attention(model) as records:
        if args.grad_cam is None:
            with torch.no_grad():
                model(image.batch)
        else:
            cam = viz.grad_cam(model, image.batch, args.grad_cam)
            heatmaps[f"Grad-CAM {args.grad_cam} (class {int(cam.classes[0])})"] = cam.maps[0]
    figure = viz.attention_figure(image.pixels, records, layers=args.layers, heatmaps=heatmaps)
    path = viz.save_figure(figure, args.out)
    print(f"wrote {path} ({len(viz.select_layers(records, args.layers))} CBAM layers)")
    return 0
