"""The ``cbam`` command: one subcommand per capability, each in its own module here.

Every subcommand module defines ``register(subparsers)``, which adds its parser and sets
``run=function(args) -> int``. Bad input ends in one line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: list[str] = [  # module names under cbam.cli, in --help order
    "trace", "check", "profile", "bench", "visualize", "train", "eval", "convert", "demo",
]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cbam", description="CBAM toolkit: inspect, check, profile, visualise and train.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cbam ARGS``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"cbam {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbam {args.command}: interrupted", file=sys.stderr)
        return 130
