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
from collections.abc import Callable, Iterator
from typing import Any

import torch


def step_peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int, str]:
    """Run ``fn()`` once and measure the peak of tensor memory it allocates above what was live when it started.

    CUDA: ``max_memory_allocated`` after a reset, minus the bytes allocated at the start. CPU: torch's profiler
    records every tensor allocation and free (``profile_memory``); the peak of their running sum in time order is
    the step's peak. Returns (fn's result, bytes, method name).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - start, "cuda_max_allocated"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, peak, "cpu_profiler_tensor_bytes"


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
