"""The ``viz`` extra (matplotlib, Pillow), imported only where a figure or an image file is handled."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ``ImportError`` that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImportError(f"{package} is needed for figures and image files: pip install 'cbam[viz]'") from None
