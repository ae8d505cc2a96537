"""Cost metering owned by the engine: wall-clock phases, throughput, peak memory and parameter counts.

Peak memory is measured, never estimated: ``torch.cuda.max_memory_allocated`` on CUDA (reset after setup), and the
process peak resident set size on CPU (``resource.getrusage``; it includes the interpreter and libraries, so it is
an upper bound of what the run needs). The method used is recorded next to the number.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator

import torch


class CostMeter:
    """Accumulates named wall-clock phases (``train``, ``cache``, ``eval``) and image counts."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.images: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block under ``name`` (times add up over repeated entries)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def count(self, name: str, n: int) -> None:
        self.images[name] = self.images.get(name, 0) + int(n)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> tuple[float, str]:
        """(peak MB, how it was measured)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "rss"

    def throughput(self, name: str) -> float:
        """Images per second of phase ``name`` (0 when it did not run)."""
        secs = self.seconds.get(name, 0.0)
        return self.images.get(name, 0) / secs if secs > 0 else 0.0
