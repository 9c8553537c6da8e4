"""``cbam demo``: ResNet-18 with and without CBAM on the synthetic data; does CBAM help, and where does it look?"""

from __future__ import annotations

import argparse

from .model_spec import MAX_SEED, int_range


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train ResNet-18 with and without CBAM on synthetic data and compare",
        description="Train ResNet-18 with and without CBAM on generated 64x64 images (same seed, data and budget; "
                    "a few minutes on a laptop CPU), then print parameters, FLOPs, training time, test accuracy, "
                    "CBAM's time overhead and the pointing game of CBAM's spatial attention against chance. "
                    "Writes OUT/demo.json, OUT/curves.png, OUT/attention_*.png and each run's folder; "
                    "run again to resume an interrupted demo.",
    )
    parser.add_argument("--out", default=None,
                        help="output folder (default cbam-demo; cbam-demo-quick with --quick; -seedN appended for "
                             "--seed N other than 0)")
    parser.add_argument("--quick", action="store_true", help="a tiny budget: checks that everything runs")
    parser.add_argument("--seed", type=int_range(0, MAX_SEED), default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import run_demo

    out = args.out if args.out is not None else default_out(args.quick, args.seed)
    report = run_demo(out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print(f"\n{report.text}\n\noutputs in {out}/: demo.json, curves.png, attention_*.png, plain/, cbam/")
    return 0


def default_out(quick: bool, seed: int) -> str:
    """The default output folder: one per budget and seed, so that a demo with other settings starts its own."""
    return "cbam-demo" + ("-quick" if quick else "") + (f"-seed{seed}" if seed else "")
