"""Cost metering owned by the engine: wall-clock phases, throughput, peak memory and parameter counts.

Peak memory is measured, never estimated, and the method is recorded next to the number:

* CUDA: ``torch.cuda.max_memory_allocated``, reset after setup and after every feature-caching phase (the peak of
  building a cache is not a training step's), keeping the largest training peak seen (``cuda_max_allocated``);
* CPU: the tensors live when a sampled training step starts (found through the garbage collector) plus the peak of
  the step's own allocations from torch's profiler memory events (``cpu_profiler_tensor_bytes``); the sampled step
  is timed apart (``meter``), so profiling never inflates the training time;
* and on both, the process peak resident set size (``peak_rss_mb``: interpreter and libraries included, an upper
  bound of what the run needs).
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


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU tensor storage reachable by the garbage collector right now."""
    import gc

    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu":  # type(): no __class__ hooks
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001  (tensor subclasses and wrappers that refuse storage access)
            continue
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def peak_rss_mb() -> float:
    """The process peak resident set size in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class CostMeter:
    """Accumulates named wall-clock phases (``train``, ``cache``, ``eval``) and image counts."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.images: dict[str, int] = {}
        self.cpu_peak_bytes = 0  # the largest sampled training step (CPU)
        self._cuda_peak = 0  # the largest training peak before the last reset (CUDA)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block under ``name`` (times add up over repeated entries). A ``cache`` phase's memory
        peak is kept out of the training peak on CUDA."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            if name == "cache":
                self._cuda_peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(self.device))
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                if name == "cache":
                    torch.cuda.reset_peak_memory_stats(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metered_step(self, fn: Callable[[], Any]) -> Any:
        """Run one training step and measure its peak tensor memory (CPU; on CUDA the allocator already does).

        The step is timed under ``meter``, which the training time leaves out (profiling slows it down)."""
        if self.device.type == "cuda":
            return fn()
        with self.phase("meter"):
            before = live_tensor_bytes()
            out, step, _ = step_peak_bytes(fn, self.device)
        self.cpu_peak_bytes = max(self.cpu_peak_bytes, before + step)
        return out

    def count(self, name: str, n: int) -> None:
        self.images[name] = self.images.get(name, 0) + int(n)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> tuple[float, str]:
        """(peak MB, how it was measured): the training peak, or the process peak RSS when no step was sampled."""
        if self.device.type == "cuda":
            peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(self.device))
            return peak / 2**20, "cuda_max_allocated"
        if self.cpu_peak_bytes:
            return self.cpu_peak_bytes / 2**20, "cpu_profiler_tensor_bytes"
        return peak_rss_mb(), "rss"

    def throughput(self, name: str) -> float:
        """Images per second of phase ``name`` (0 when it did not run)."""
        secs = self.seconds.get(name, 0.0)
        return self.images.get(name, 0) / secs if secs > 0 else 0.0
