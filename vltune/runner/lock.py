"""One runner per output folder: an advisory ``flock`` on ``<output>/.vltune-runner.lock``.

The kernel drops the lock when its process ends, however it ends (kill -9 included), so a stale lock file never
blocks the next run. The file holds who holds the lock, for the second runner's error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import IO


class LockedError(RuntimeError):
    """Another runner holds the output folder."""


class RunnerLock:
    """``with RunnerLock(output_root): ...`` holds the folder for this process, or raises ``LockedError``."""

    NAME = ".vltune-runner.lock"

    def __init__(self, output_root: str) -> None:
        self.path = os.path.join(output_root, self.NAME)
        self._file: IO[str] | None = None

    def __enter__(self) -> RunnerLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            f.close()
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
                   if holder else "another process")
            raise LockedError(f"another vltune runner ({who}) is running on {os.path.dirname(self.path)}; wait for "
                              "it to finish (or stop it), or set base['output']['root'] to another folder") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
