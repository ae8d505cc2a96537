"""What the runner shows while a suite runs: a live rich panel on a terminal, plain lines otherwise.

Both show jobs done / running (and how many of those an executor such as SLURM still holds queued) / failed /
skipped / left, elapsed time and an ETA (the mean duration of the jobs this run has finished × the jobs left ÷ the
slots). The live panel adds each device's occupancy and running jobs; plain
mode prints one line per job start and end, which suits log files and CI.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from vltune.runner.scheduler import JobState, Scheduler

_MARK = {"success": "ok", "failed": "FAILED", "cancelled": "cancelled", "skipped": "skipped"}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _phase(state: JobState) -> str:
    """"queued " for a job its executor has submitted that has not started yet (SLURM), else ""."""
    return "queued " if getattr(state.handle, "phase", "running") == "queued" else ""


class Progress:
    """Follows a ``Scheduler`` through its ``on_event`` callback and the run loop's ``tick``."""

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live_mode = self.stream.isatty() if live is None else live
        self.scheduler: Scheduler | None = None
        self.started = time.time()
        self._live: Any = None
        self._last = 0.0
        self._events: list[str] = []

    def attach(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.started = time.time()
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.stream), auto_refresh=False, transient=False)
            self._live.start()

    # ---- numbers --------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        states = self.scheduler.states
        c = {k: sum(s.status == k for s in states) for k in ("success", "running", "failed", "cancelled",
                                                              "skipped", "pending")}
        c["queued"] = sum(s.status == "running" and bool(_phase(s)) for s in states)
        c["total"] = len(states)
        return c

    def eta(self) -> float | None:
        """Seconds left, from the jobs this run has finished; None before the first one ends."""
        ran = [s.wall_s for s in self.scheduler.states if s.wall_s > 0 and not s.previous]
        if not ran:
            return None
        c = self.counts()
        slots = max(1, sum(self.scheduler.capacity.values()))
        return sum(ran) / len(ran) * (c["pending"] + 0.5 * c["running"]) / slots

    def summary(self) -> str:
        c = self.counts()
        queued = f" ({c['queued']} of them queued)" if c["queued"] else ""
        return (f"{c['success']}/{c['total']} done, {c['running']} running{queued}, {c['failed']} failed, "
                f"{c['skipped']} skipped, {c['cancelled']} cancelled, {c['pending']} left | elapsed "
                f"{_clock(time.time() - self.started)}, ETA {_clock(self.eta())}")

    # ---- callbacks ------------------------------------------------------------------------------------------
    def event(self, kind: str, state: JobState) -> None:
        if state.previous:
            return
        job = state.job
        if kind == "running":
            line = f"{'queued ' if _phase(state) else 'start  '} {job.label} on {state.handle.device}"
        else:
            line = f"{_MARK.get(kind, kind):9s} {job.label}" + (f" ({state.wall_s:.1f} s)" if state.wall_s else "")
            if kind in ("failed", "cancelled") and state.record:
                line += f": {state.record.get('error', '')} -> {job.out}"
        if self.live_mode:
            self._events = (self._events + [line])[-6:]
        else:
            print(f"{line}  [{self.summary()}]", file=self.stream, flush=True)

    def tick(self) -> None:
        if not self._live or time.time() - self._last < 0.25:
            return
        self._last = time.time()
        self._live.update(self._panel(), refresh=True)

    def _panel(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        table = Table(box=None, show_header=True, header_style="bold")
        table.add_column("device")
        table.add_column("slots")
        table.add_column("running")
        now = time.time()
        by_device: dict[Any, list[JobState]] = {d: [] for d in self.scheduler.capacity}
        for s in self.scheduler.running():
            by_device.setdefault(s.handle.device, []).append(s)
        for device, states in by_device.items():
            jobs = "; ".join(f"{s.job.label} ({_phase(s)}{_clock(now - s.handle.started)})" for s in states) or "idle"
            table.add_row(str(device), f"{len(states)}/{self.scheduler.capacity.get(device, 0)}", jobs)
        from rich.text import Text

        return Group(Text(f"vltune {self.summary()}", style="bold"), table, *(Text(e) for e in self._events))

    def close(self) -> None:
        if self._live:
            self._live.update(self._panel(), refresh=True)
            self._live.stop()
            self._live = None
        print(self.summary(), file=self.stream, flush=True)
