"""``cbam visualize``: draw a model's CBAM attention on an image and write the figure."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..viz.image import MIN_SIDE
from .model_spec import add_model_arguments, add_prefix_argument, int_range, model_from_args

MAX_SIDE = 4096  # --size: larger inputs take minutes and gigabytes, and draw nothing more


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "visualize", help="draw CBAM's spatial and channel attention on an image",
        description="Run the model on one image and write a figure: every CBAM's spatial map over the image and "
                    "its channel weights (PNG, SVG or PDF by the --out extension).",
    )
    add_model_arguments(parser)
    parser.add_argument("--checkpoint", type=Path,
                        help="weights in any layout cbam convert reads (cbam, official, timm; .pt or .safetensors), "
                             "converted to the model's; a cbam train checkpoint brings its own model settings "
                             "(--model, --attention, --preset, --stem, --num-classes are then ignored)")
    add_prefix_argument(parser)
    parser.add_argument("--image", type=Path, required=True, help="any image Pillow reads")
    parser.add_argument("--size", type=int_range(MIN_SIDE, MAX_SIDE), default=224,
                        help="side of the square model input (default 224)")
    parser.add_argument("--layers", nargs="+", metavar="NAME",
                        help="layers to draw, by name or prefix (layer4: layer4.0.cbam, layer4.1.cbam); default all")
    parser.add_argument("--grad-cam", metavar="LAYER",
                        help="add a Grad-CAM panel for this module's output (e.g. layer4)")
    parser.add_argument("--out", type=Path, default=Path("attention.png"), help="figure file (default attention.png)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import viz
    from ..atomic import check_destination
    from ..convert import load_weights
    from ..train import model_for, read_checkpoint
    from ..train.checkpoint import check_run_checkpoint, is_run_checkpoint
    from ..viz.extras import require

    try:
        require("matplotlib.figure")
        require("PIL.Image")
    except ImportError as error:  # one line, like every other error here
        raise RuntimeError(str(error)) from None
    if args.prefix is not None and args.checkpoint is None:
        raise ValueError(f"--prefix picks the keys --checkpoint loads; got --prefix {args.prefix!r} without "
                         "--checkpoint")
    viz.figure_format(args.out)
    check_destination(args.out, inputs=(args.image, args.checkpoint))
    image = viz.load_image(args.image, args.size)
    weights = args.checkpoint  # a path, or below the state dict of a cbam train checkpoint
    content = None if weights is None else read_checkpoint(weights)
    if is_run_checkpoint(content):  # as cbam eval: the model the run trained, with its settings
        check_run_checkpoint(content, args.checkpoint)
        model, weights = model_for(content["config"], len(content["classes"])), content["model"]
    else:
        model = model_from_args(args)
    if weights is not None:  # attention left at initialisation would draw nothing learnt: strict
        print(load_weights(weights, model, prefix=args.prefix, allow_missing_attention=False,
                           source_name=f"checkpoint {str(args.checkpoint)!r}"))
    model.eval()
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
