"""``save_figure``: write a matplotlib figure atomically, its format taken from the file extension."""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_atomic

FORMATS = {"": "png", ".png": "png", ".svg": "svg", ".pdf": "pdf"}


def figure_format(path) -> str:
    """``"png"``, ``"svg"`` or ``"pdf"`` from ``path``'s extension (none: PNG); ``ValueError`` for others."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"a figure path must end in .png, .svg or .pdf, got {str(path)!r}")
    return FORMATS[suffix]


def save_figure(figure, path, *, dpi: float | None = None) -> Path:
    """Write ``figure`` to ``path`` and return the path; readers never see a half-written file.

    Written through ``cbam.atomic.write_atomic``: on any error an existing ``path`` is left as it was. ``dpi``:
    ``None`` uses matplotlib's ``savefig.dpi`` setting. The directory must exist.
    """
    kind = figure_format(path)
    return write_atomic(path, lambda file: figure.savefig(file, format=kind, dpi=dpi))
