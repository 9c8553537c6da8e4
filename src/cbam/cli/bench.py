"""``cbam bench``: the fused CBAM against timm, our reference path and a plain copy (Markdown tables)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time the fused CBAM against timm, the reference path and a copy",
        description="Time CBAM modules at ResNet-50 stage shapes, fp32 on the CPU: timm's CbamModule (when timm "
                    "is installed; else speed-ups are over our reference path), CBAM(preset='timm') on the "
                    "reference path, fused on plain torch ops and fused on the C++ engine (when it builds), next "
                    "to a copy of the input. Forward in eval mode without autograd, forward+backward in train "
                    "mode; medians of interleaved repeats. Prints Markdown tables.",
    )
    parser.add_argument("--repeats", type=int, default=5,
                        help="forward rounds (default 5); forward+backward takes max(3, N//2), --resnet max(3, N)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated CxH of (batch, C, H, H) inputs (default 256x56,512x28,1024x14,2048x7)")
    parser.add_argument("--resnet", action="store_true", help="also time CBAM's overhead in ResNet-50 at 224x224")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the reference path")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..profile import fused_bench
    from ..validation import check_int

    repeats, batch = check_int("--repeats", args.repeats), check_int("--batch", args.batch)
    shapes = fused_bench.SHAPES if args.shapes is None else fused_bench.parse_shapes(args.shapes)
    report = fused_bench.run(batch, repeats, shapes, resnet=args.resnet, compile_reference=args.compile)
    print(json.dumps(report.as_dict(), indent=2, allow_nan=False) if args.json else report)
    return 0
