"""Process checks shared by the runner tests and the test SLURM cluster (standard library only)."""

from __future__ import annotations

import os
import signal


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie counts as ended: it only waits for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def default_sigint() -> None:
    """A ``preexec_fn`` that puts SIGINT back to its default in the child. A test session started in the background
    (``cmd &``, as CI may start it) inherits SIGINT ignored; Python then installs no ``KeyboardInterrupt`` handler, so
    a driver spawned from it would never see the Ctrl-C a test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
