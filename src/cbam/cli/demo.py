"""``cbam demo``: ResNet-18 with and without CBAM on the synthetic data; does CBAM help, and where does it look?"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train ResNet-18 with and without CBAM on synthetic data and compare",
        description="Train ResNet-18 with and without CBAM on generated 64x64 images (same seed, data and budget; "
                    "a few minutes on a laptop CPU), then print parameters, FLOPs, training time, test accuracy, "
                    "CBAM's time overhead and the pointing game of CBAM's spatial attention against chance. "
                    "Writes OUT/demo.json, OUT/curves.png, OUT/attention_*.png and each run's folder; "
                    "run again to resume an interrupted demo.",
    )
    parser.add_argument("--out", default="cbam-demo", help="output folder (default cbam-demo)")
    parser.add_argument("--quick", action="store_true", help="a tiny budget: checks that everything runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import run_demo

    report = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print(f"\n{report.text}\n\noutputs in {args.out}/: demo.json, curves.png, attention_*.png, plain/, cbam/")
    return 0
