"""Cost metering owned by the engine: wall-clock phases, throughput, peak memory and parameter counts.

Peak memory is measured, never estimated, and the method is recorded next to each number. Two peaks are kept apart:
the training peak (``train``) and the test evaluation's peak (``eval``); a trained run reports both, an
evaluation-only run the evaluation peak only. Each comes from the device's one meter, never from another:

* CUDA (``cuda_max_allocated``): ``torch.cuda.max_memory_allocated``. The peak statistics are reset after setup and
  around every phase whose peak is not training's: the test evaluation (``eval``, whose own peak is the evaluation
  peak), validation passes for model selection (``val``) and feature caching (``cache``); the training peak is the
  largest peak seen outside them.
* CPU (``cpu_profiler_tensor_bytes``): one sampled step per kind, measured as the bytes of the tensors live when the
  step starts (found through the garbage collector: the model, optimizer state, cached features such as the class
  text features ``before_evaluate`` builds) plus the peak of the step's own allocations from torch's profiler memory
  events. Training samples the run's second step (the first warms up), evaluation the test loader's second batch;
  either samples the only one when there is only one. A sampled step is timed apart (``meter`` /
  ``eval_meter``), so profiling inflates neither the training nor the evaluation time or throughput, except an
  only step, whose time is the phase's only time.

Start-up (``startup_s``): seconds from the moment the runner launched the job (``VLTUNE_JOB_LAUNCHED_AT``, set by
``vltune.runner.executor``) to its first batch, training or (evaluation-only jobs) evaluation: interpreter start,
imports, data and model setup. None when no runner launched the process (a hand-run ``train.py``, ``--debug``).

Where a meter cannot run (no training step in an evaluation-only run, no test evaluation, an empty test loader) the
peak is None and the reason is kept in ``notes`` (``meter_notes`` in the record). Separately, on both devices, the
process peak resident set size (``peak_rss_mb``: interpreter and libraries included, an upper bound of what the run
needs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: which peak a phase's CUDA memory belongs to when it is not training's (None: nobody's)
_PEAK_OWNER: dict[str, str | None] = {"eval": "eval", "val": None, "cache": None}
#: the phase a sampled step of each kind is timed under, apart from the kind's own phase
_APART = {"train": "meter", "eval": "eval_meter"}
#: why a kind has no peak when nothing else was said
_NOT_RUN = {"train": "no training step ran", "eval": "no test evaluation ran"}


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


LAUNCHED_AT = "VLTUNE_JOB_LAUNCHED_AT"  # the runner's launch time of this job (vltune.runner.executor)


def launch_time() -> float | None:
    """When the runner launched this process's job (``time.time()``), or None when no runner did."""
    try:
        return float(os.environ[LAUNCHED_AT])
    except (KeyError, ValueError):
        return None


def peak_rss_mb() -> float:
    """The process peak resident set size in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class CostMeter:
    """Accumulates named wall-clock phases (``train``, ``cache``, ``eval``, ...), image counts and the two peaks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.images: dict[str, int] = {}
        self.notes: list[str] = []  # why a peak is missing (result.json's ``meter_notes``)
        self.sampled: set[str] = set()  # kinds ("train", "eval") with a metered step
        self.cpu_peak_bytes: dict[str, int] = {}  # per kind: the largest sampled step (CPU)
        self._cuda_peak: dict[str, int] = {}  # per kind: the largest peak before the last reset (CUDA)
        self._owner: list[str | None] = ["train"]  # whose peak the CUDA allocator is measuring now (innermost last)
        self._unmetered: dict[str, str] = {}
        self.launched_at = launch_time()
        self.first_batch_at: float | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block under ``name`` (times add up over repeated entries). On CUDA, the peak of an
        ``eval`` phase is the evaluation peak, and those of ``val`` and ``cache`` phases are nobody's: none of them
        enters the training peak."""
        cuda = self.device.type == "cuda"
        switch = cuda and name in _PEAK_OWNER
        if cuda:
            torch.cuda.synchronize(self.device)
        if switch:
            self._fold_cuda_peak()
            self._owner.append(_PEAK_OWNER[name])
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            if switch:
                self._fold_cuda_peak()
                self._owner.pop()
                torch.cuda.reset_peak_memory_stats(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _fold_cuda_peak(self) -> None:
        """Credit the allocator's peak since its last reset to whoever it was measuring."""
        owner = self._owner[-1]
        if owner is not None:
            self._cuda_peak[owner] = max(self._cuda_peak.get(owner, 0), torch.cuda.max_memory_allocated(self.device))

    def metered_step(self, fn: Callable[[], Any], kind: str = "train", apart: bool = True) -> Any:
        """Run the sampled step of ``kind`` ("train" or "eval") and measure its peak tensor memory (CPU: live tensors
        plus the step's profiler peak; on CUDA the allocator measures every step already).

        With ``apart`` the step is timed under ``meter`` (training) or ``eval_meter`` (evaluation), which the phase's
        time leaves out (profiling slows it down); without it, its time stays in the enclosing phase."""
        self.sampled.add(kind)
        with self.phase(_APART[kind]) if apart else contextlib.nullcontext():
            if self.device.type == "cuda":
                return fn()
            before = live_tensor_bytes()
            out, step, _ = step_peak_bytes(fn, self.device)
        self.cpu_peak_bytes[kind] = max(self.cpu_peak_bytes.get(kind, 0), before + step)
        return out

    def unmetered(self, kind: str, reason: str) -> None:
        """Say why ``kind`` has no sampled step (reported only if none is ever sampled)."""
        self._unmetered[kind] = reason

    def note(self, text: str) -> None:
        """Keep and log a note on the metering (once)."""
        if text not in self.notes:
            self.notes.append(text)
            logger.info(f"Cost meter: {text}")

    def first_batch(self) -> None:
        """Mark that the run's first batch (training or evaluation) is in hand; later calls change nothing."""
        if self.first_batch_at is None:
            self.first_batch_at = time.time()

    def startup_s(self) -> float | None:
        """Seconds from the runner's launch of the job to its first batch, or None (no runner, no batch yet)."""
        if self.launched_at is None or self.first_batch_at is None:
            return None
        return round(max(self.first_batch_at - self.launched_at, 0.0), 3)

    def count(self, name: str, n: int) -> None:
        self.images[name] = self.images.get(name, 0) + int(n)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self, kind: str) -> tuple[float | None, str | None]:
        """(peak MB, how it was measured) of ``kind`` ("train" or "eval"), or (None, None) with a note saying why
        when it was not metered: never another meter's number."""
        if kind not in self.sampled:
            self.note(f"{kind} peak: {self._unmetered.get(kind, _NOT_RUN[kind])}")
            return None, None
        if self.device.type == "cuda":
            peak = self._cuda_peak.get(kind, 0)
            if self._owner[-1] == kind:  # still measuring it: the allocator's running peak counts too
                peak = max(peak, torch.cuda.max_memory_allocated(self.device))
            return peak / 2**20, "cuda_max_allocated"
        return self.cpu_peak_bytes[kind] / 2**20, "cpu_profiler_tensor_bytes"

    def net_seconds(self, name: str) -> float:
        """Seconds of phase ``name`` without its sampled step's (timed apart, see ``metered_step``)."""
        apart = self.seconds.get(_APART[name], 0.0) if name in _APART else 0.0
        return max(self.seconds.get(name, 0.0) - apart, 0.0)

    def throughput(self, name: str) -> float:
        """Images per second of phase ``name`` without its sampled step (0 when it did not run)."""
        secs = self.net_seconds(name)
        return self.images.get(name, 0) / secs if secs > 0 else 0.0
