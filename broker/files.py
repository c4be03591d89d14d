"""Files the broker keeps in ``node.data_dir``, replaced atomically.

Write a temporary file next to the target, fsync it, rename it over the target, fsync the
directory: after a crash or ``kill -9`` at any moment the file holds either the old or the new
content, never a torn one. The temporary file is created mode 0600 (``mkstemp``), whatever the
umask: ban lists and password hashes are for the broker alone.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def replace_atomically(path: Path, data: bytes) -> None:
    """Make ``path`` hold ``data`` (its directory created mode 0700 if missing).

    Raises:
        OSError: it cannot be written; the old file is then intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
