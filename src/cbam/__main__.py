"""``python -m cbam``: the ``cbam`` command."""

import sys

from .cli import main

sys.exit(main())
