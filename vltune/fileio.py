"""Atomic file writes: every file vltune writes (records, checkpoints, caches, splits) appears whole or not at all,
so a reader (the runner, a resumed run) never sees a half-written file after a crash or a kill."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str, write: Callable[[BinaryIO], object] | bytes) -> None:
    """Write ``path`` through a temporary file in the same folder, then ``os.replace`` it into place.

    Args:
        path: destination; its folder is created if missing.
        write: the bytes to write, or a function that writes to the open binary file (e.g. ``torch.save``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
