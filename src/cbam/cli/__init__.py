"""The ``cbam`` command: one subcommand per capability, each in its own module here.

Every subcommand module defines ``register(subparsers)``, which adds its parser and sets
``run=function(args) -> int``. Bad input ends in one line on stderr and exit status 2, any other error in one
line and status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

import torch

from .. import __version__

SUBCOMMANDS: list[str] = [  # module names under cbam.cli, in --help order
    "trace", "check", "profile", "bench", "visualize", "train", "eval", "convert", "demo",
]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cbam", description="CBAM toolkit: inspect, check, profile, visualise and train.")
    parser.add_argument("--version", action="version", version=f"cbam {__version__} (torch {torch.__version__})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _interrupted(error: BaseException) -> bool:
    """Whether ``error`` was raised while handling a Ctrl-C (torch's file writer turns one into a RuntimeError)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def _where(error: BaseException) -> str:
    """``file:line`` of the frame that raised ``error``."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    return f" (at {frame.filename}:{frame.lineno})" if frame else ""


def main(argv: list[str] | None = None) -> int:
    """Run ``cbam ARGS``; returns the exit status: 2 for bad input, 1 for any other error (a user model's
    forward that raises, say: its type and where it was raised), 130 for Ctrl-C; one line on stderr each."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"cbam {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        if _interrupted(error):
            print(f"cbam {args.command}: interrupted", file=sys.stderr)
            return 130
        print(f"cbam {args.command}: error: {_first_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - not a traceback: one line naming the error and its place
        print(f"cbam {args.command}: error: {type(error).__name__}: {_first_line(error)}{_where(error)}",
              file=sys.stderr)
        return 1
