"""``write_atomic``: write a file so that readers see the old content or the new, never a part."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    A crash or an error at any moment leaves ``path`` as it was (the temporary file is removed on
    errors; after a SIGKILL a hidden ``.NAME.*.tmp`` may remain beside it). The directory must exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    """``write_atomic`` for UTF-8 text."""
    return write_atomic(path, lambda file: file.write(text.encode()))
