"""``cbam trace``: every module call of one forward pass with its shapes, CBAM's inner steps included."""

from __future__ import annotations

import argparse
import sys

from .model_spec import add_input_arguments, add_model_arguments, build_model_and_input, print_report


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "trace", help="shape trace of one forward pass",
        description="Trace one forward pass (eval mode) of a random input: module, type, input and output shapes, "
                    "dtype, parameters; CBAM's pooled descriptors, statistics and gates. Exit status 1 if the "
                    "forward fails: the trace then ends at the module that raised.",
    )
    add_model_arguments(parser)
    add_input_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..debug import trace_shapes

    model, x = build_model_and_input(args)
    trace = trace_shapes(model, x)
    print_report(args, str(trace), trace.as_dict())
    if trace.ok:
        return 0
    where = "" if trace.failed is None else f" in {trace.failed.path or '(model)'} ({trace.failed.type})"
    lines = str(trace.error).strip().splitlines()
    print(f"cbam trace: error: the forward failed{where}: {type(trace.error).__name__}"
          + (f": {lines[0]}" if lines else ""), file=sys.stderr)
    return 1
