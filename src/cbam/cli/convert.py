"""``cbam convert``: a checkpoint in any layout ``load_weights`` reads, written in ours, timm's or the official one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .model_spec import add_model_arguments, add_prefix_argument, model_from_args

TARGETS = ("cbam", "timm", "official")
TIMM_MLP_BIASES = ("channel.fc1.bias", "channel.fc2.bias")  # timm's CbamModule(mlp_bias=True) only


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint between cbam, timm and the official CBAM code",
        description="Read IN (.pt/.pth/.pth.tar/.bin with weights_only=True, or .safetensors), find its state dict "
                    "(under state_dict, model, state_dict_ema, model_ema, module or the top level), strip module./"
                    "_orig_mod. prefixes (and an AveragedModel's n_averaged), detect its layout (cbam, the official "
                    "ResidualNet, timm's ResNet with attn_layer='cbam', a plain torchvision/timm ResNet) and write OUT "
                    "(.safetensors or .pt) in the --to layout, atomically. With --model the weights are first loaded "
                    "into that model, so a checkpoint that does not fit it is refused (and a LightningModule's "
                    "attribute prefix, such as net., is stripped).",
    )
    parser.add_argument("input", type=Path, metavar="IN", help="checkpoint to read")
    parser.add_argument("output", type=Path, metavar="OUT",
                        help="file to write: .safetensors, .pt, .pth, .pth.tar or .bin")
    parser.add_argument("--to", default="cbam", choices=TARGETS,
                        help="layout of OUT: cbam (cbam.models), timm (resnet* with attn_layer='cbam'; CBAMs with MLP "
                             "biases: CbamModule(mlp_bias=True)) or official (ResidualNet(..., 'CBAM')); default cbam")
    add_model_arguments(parser)
    parser.set_defaults(model=None)
    parser.add_argument("--entry", default=None, help="take the state dict from this entry (e.g. state_dict_ema)")
    add_prefix_argument(parser)
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_destination
    from ..convert import (
        as_ours,
        detect,
        find_state_dict,
        load_weights,
        read_file,
        to_official,
        to_timm,
    )
    from ..convert.read import describe_stripped, unwrap
    from ..convert.write import check_weights_path, save_weights

    out = check_destination(check_weights_path(args.output), inputs=(args.input,))
    if out.exists() and not args.force:
        raise FileExistsError(f"{str(out)!r} exists; pass --force to replace it")
    source = f"checkpoint {str(args.input)!r}"
    content = read_file(args.input)
    if args.model is not None:
        model = model_from_args(args)
        report = load_weights(content, model, entry=args.entry, prefix=args.prefix, source_name=source)
        print(report)
        state, layout = model.state_dict(), report.target  # the model's layout, converted below
    else:
        found, entry = find_state_dict(content, source, args.entry)
        stripped = unwrap(found, source, args.prefix)
        layout = detect(stripped.state)
        done = [describe_stripped(stripped.removed)] if stripped.removed else []
        print(f"{args.input}: {layout}" + (f" under {entry!r}" if entry else "") + "".join(f"; {d}" for d in done))
        state = as_ours(stripped.state, layout)
    target = {"cbam": lambda sd: sd, "timm": to_timm, "official": to_official}[args.to](state)
    path = save_weights(out, target)
    converted = f"converted {layout.name} -> {args.to}; " if layout.name not in ("plain", args.to) else ""
    print(f"{converted}wrote {path} ({len(target)} tensors, {args.to} layout)")
    if args.to == "timm" and any(key.endswith(TIMM_MLP_BIASES) for key in target):
        print("note: its CBAMs keep their MLP biases, as timm's CbamModule(mlp_bias=True) has them; timm's "
              "attn_layer='cbam' ResNets have none and refuse these keys", file=sys.stderr)
    return 0
