"""Logging for one run: plain ``%(message)s`` lines (Dassl's wording) to stdout and ``<output_dir>/log.txt``.

Library modules log through ``logging.getLogger(__name__)`` and never print; the CLI calls ``setup_logging`` once.
An existing ``log.txt`` is kept and the new file gets a timestamp suffix, as Dassl does, so old parsers still find
the finished run's lines in ``log.txt``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_FORMAT = "%(message)s"
# vltune's own loggers log at INFO; everything else (open_clip logs through the root logger) only from WARNING up.
_OWN = ("vltune", "trainers", "datasets", "train", "parallel_runner")


def setup_logging(output_dir: str | None = None, level: int = logging.INFO, console: bool = True) -> str | None:
    """Configure the root logger (stdout unless ``console`` is False); returns the log file path, if any."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_vltune", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)
    for name in _OWN:
        logging.getLogger(name).setLevel(level)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)] if console else []
    path = None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "log.txt")
        if os.path.exists(path):
            path += time.strftime("-%Y-%m-%d-%H-%M-%S")
        handlers.append(logging.FileHandler(path))
    if not handlers:  # a root without handlers lets the first logging.info() call (open_clip's) basicConfig stderr
        handlers.append(logging.NullHandler())
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._vltune = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    return path
