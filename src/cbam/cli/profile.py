"""``cbam profile``: parameters and FLOPs per module with the attention share; latency and memory."""

from __future__ import annotations

import argparse

from ..validation import check_int
from .model_spec import add_input_arguments, add_model_arguments, build_model_and_input, print_report


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile", help="parameters, FLOPs, latency and memory",
        description="Count parameters and FLOPs (a multiply-add counts 2; the paper's GFLOPs are the "
                    "multiply-adds) of one forward pass in eval mode, per module and for the attention modules; "
                    "with --benchmark also time it and measure its memory.",
    )
    add_model_arguments(parser)
    add_input_arguments(parser)
    parser.add_argument("--depth", type=int, default=2, help="module-path depth of the table (default 2)")
    parser.add_argument("--benchmark", action="store_true", help="also measure latency and memory")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up rounds of --benchmark (default 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds of --benchmark (default 10)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..profile import benchmark, cost

    depth = check_int("--depth", args.depth, minimum=0)
    warmup, repeats = check_int("--warmup", args.warmup, minimum=0), check_int("--repeats", args.repeats)  # even unused
    model, x = build_model_and_input(args)
    report = cost(model, x)
    text, data = report.format(depth=depth), {"cost": report.as_dict()}
    if args.benchmark:
        timing = benchmark({args.model: model}, x, warmup=warmup, repeats=repeats)
        text, data["benchmark"] = f"{text}\n\n{timing}", timing.as_dict()
    print_report(args, text, data)
    return 0
