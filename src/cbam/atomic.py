"""``write_atomic``: write a file so that readers see the old content or the new, never a part."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def check_destination(path, inputs=()) -> Path:
    """``path`` as a ``Path`` if ``write_atomic`` can put a file there: its directory exists, it is no directory
    and none of the files ``inputs`` (paths or ``None``) that the work reads.

    Call it before long work whose result goes to ``path``, so that a bad path fails first.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory")
    for source in inputs:
        if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
            raise ValueError(f"cannot write {str(path)!r}: it is the input {str(source)!r}; name another file")
    return path


def check_folder(path) -> Path:
    """``path`` as a ``Path`` if a folder is or can be made there: neither it nor a parent is a file."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"cannot write into folder {str(path)!r}: {str(folder)!r} is a file")
    return path


def write_atomic(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    A crash or an error at any moment leaves ``path`` as it was (the temporary file is removed on
    errors; after a SIGKILL a hidden ``.NAME.*.tmp`` may remain beside it). The directory must exist.
    A file rewritten keeps its permission bits, and a symbolic link stays a link with its target
    rewritten, as writing in place does. Errors name ``path``, not the temporary file.
    """
    path = check_destination(path)
    if path.is_symlink():  # the rename goes over the link's target, beside it
        return _replace(check_destination(path.resolve()), write, shown=path)
    return _replace(path, write, shown=path)


def _replace(path: Path, write: Callable[[BinaryIO], None], shown: Path) -> Path:
    """``write_atomic``'s work on ``path``, a file or none yet; errors name ``shown``; returns ``shown``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if path.exists():
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    except BaseException as error:
        _remove(temporary)
        if isinstance(error, OSError) and error.filename in (None, str(temporary)):  # the temporary file failed
            raise type(error)(f"cannot write {str(shown)!r}: {error.strerror or error}") from None
        raise
    return shown


def _remove(temporary: Path) -> None:
    """Remove ``temporary`` if it is there; a directory that refuses (a read-only file system refuses even
    to unlink what is absent) leaves the first error to be reported."""
    try:
        temporary.unlink(missing_ok=True)
    except OSError:
        pass


def write_text_atomic(path, text: str) -> Path:
    """``write_atomic`` for UTF-8 text."""
    return write_atomic(path, lambda file: file.write(text.encode()))
