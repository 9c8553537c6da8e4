"""``save_figure``: write a matplotlib figure atomically, its format taken from the file extension."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

FORMATS = {"": "png", ".png": "png", ".svg": "svg", ".pdf": "pdf"}


def figure_format(path) -> str:
    """``"png"``, ``"svg"`` or ``"pdf"`` from ``path``'s extension (none: PNG); ``ValueError`` for others."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"a figure path must end in .png, .svg or .pdf, got {str(path)!r}")
    return FORMATS[suffix]


def save_figure(figure, path, *, dpi: float | None = None) -> Path:
    """Write ``figure`` to ``path`` and return the path; readers never see a half-written file.

    The figure goes to a temporary file beside ``path`` and is then renamed over it (``os.replace``);
    on any error the temporary file is removed and an existing ``path`` is left as it was. ``dpi``:
    ``None`` uses matplotlib's ``savefig.dpi`` setting. The directory must exist.
    """
    path = Path(path)
    kind = figure_format(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            figure.savefig(file, format=kind, dpi=dpi)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
