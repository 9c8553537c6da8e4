"""Plain-text tables and the numbers in them, for the reports of ``cbam.debug`` and ``cbam.profile``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """Columns padded to their widest cell; ``align`` has one ``l``/``r`` per column (default: all ``l``).

    >>> print(format_table(["name", "n"], [["a", 1], ["bb", 22]], align="lr"))
    name   n
    ----  --
    a      1
    bb    22
    """
    cells = [[str(cell) for cell in row] for row in rows]
    align = align or "l" * len(headers)
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align must have one 'l' or 'r' per column ({len(headers)}), got {align!r}")
    widths = [max([len(str(h)), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align))
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def format_count(value: float) -> str:
    """``1234567`` -> ``'1.23M'``: a count with an SI suffix (k, M, G, T), three significant digits."""
    rounded = abs(float(f"{value:.3g}"))  # 999_999 rounds to 1e6: '1M', not '1e+03k'
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rounded >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_bytes(value: int) -> str:
    """``3 * 2**20`` -> ``'3.00 MiB'``."""
    for suffix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{value} B"


def format_shape(value) -> str:
    """A shape description from ``describe`` as text: ``(2, 64, 8, 8)``, lists in brackets, dicts in braces."""
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(map(format_shape, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_shape(v)}" for k, v in value.items()) + "}"
    return str(value)
