"""``cbam visualize``: draw a model's CBAM attention on an image and write the figure."""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..viz.image import MIN_SIDE
from .model_spec import add_model_arguments, build_model


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "visualize", help="draw CBAM's spatial and channel attention on an image",
        description="Run the model on one image and write a figure: every CBAM's spatial map over the image and "
                    "its channel weights (PNG, SVG or PDF by the --out extension).",
    )
    add_model_arguments(parser)
    parser.add_argument("--checkpoint", type=Path, help="weights: a state dict, or a dict holding one under 'model'")
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


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _load_error(error: Exception) -> str:
    """One line for why ``torch.load`` failed; torch's weights-only refusal is a paragraph with the cause inside."""
    marker = "WeightsUnpickler error:"
    if isinstance(error, pickle.UnpicklingError) and marker in str(error):
        cause = _first_line(str(error).split(marker, 1)[1]).split(". ")[0]
        return f"weights-only loading (tensors and plain containers, never code) refused it: {cause}"
    return _first_line(str(error)) or type(error).__name__


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load weights from ``path`` into ``model``, strictly; only tensors are unpickled (``weights_only``).

    Accepts a bare state dict or a dict with the state dict under ``"model"``. Every key must match:
    attention maps from a model whose CBAMs kept their random initialisation would mislead.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch.load raises pickle, zip, EOF and runtime errors for a bad file
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {_load_error(error)}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} holds no state dict: expected a dict of tensors, or a dict "
                         f"with one under 'model'; got {type(state).__name__}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches: one line per key after a header line
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: {details}") from None
    if missing or unexpected:
        first = ", ".join(f"{kind} {keys[0]!r}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                          if keys)
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: {len(missing)} missing and "
                         f"{len(unexpected)} unexpected keys (first: {first})")


def run(args: argparse.Namespace) -> int:
    from .. import viz
    from ..viz.extras import require

    try:
        require("matplotlib.figure")
        require("PIL.Image")
    except ImportError as error:  # one line, like every other error here
        raise RuntimeError(str(error)) from None
    viz.figure_format(args.out)
    image = viz.load_image(args.image, args.size)
    model = build_model(args).eval()
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
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
