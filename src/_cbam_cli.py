"""The ``cbam`` console script's entry point, outside the ``cbam`` package.

Importing anything in ``cbam`` imports torch first (seconds); a Ctrl-C meanwhile would end in a
traceback from the generated script. Here the import happens inside ``main``, where it ends in one
line and exit status 130, as an interrupted command does. So this module imports nothing heavy.
"""

import sys


def main() -> int:
    """Import and run ``cbam.cli.main``; 130 for a Ctrl-C before a command has started."""
    try:
        from cbam.cli import main as run

        return run()
    except KeyboardInterrupt:
        print("cbam: interrupted", file=sys.stderr)
        return 130
