"""The job graph on a pool of device slots: no global barrier, failure isolation, resume, cancellation.

* **Lanes** (the pipeline's stages) run side by side, each on its own devices; within a lane, jobs start in task
  order, and a later task's job takes a slot only when no earlier job of the lane is ready, so slots never idle while
  an evaluation waits for its train job.
* **Slots**: a device runs at most ``slots`` jobs at once, whichever lanes they belong to; a job only ever lands on
  a device of its own lane.
* **Dependencies**: an evaluation starts as soon as its own train job has succeeded. When a job fails, is
  cancelled or is skipped, every job depending on it is recorded ``skipped``; all other jobs go on.
* **Resume**: a job whose ``result.json`` is a success with the job's identity (``vltune.config.identity``: the keys
  its computation depends on, weights by content) is not run again; a recorded failure is not retried unless
  ``rerun_failed``; everything else runs. A job that reruns makes its dependents rerun (their old results came from
  the old model). ``force`` reruns everything from an emptied folder.
* **Stale results**: a job whose folder holds a success of a *different* identity is ``stale``: it keeps its result
  and does not run (nor do the evaluations that need it), every other job runs, and ``stale_report()`` names the
  differing keys (old → new) per task; ``rerun_stale`` empties and reruns exactly those jobs.
* **Cancellation**: ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM/SIGHUP turned into it) sends SIGTERM to the process
  group of every job this scheduler started, then SIGKILL after ``grace_s``; those jobs are recorded ``cancelled``.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vltune.config.identity import format_diff, identity_diff
from vltune.results.record import JobInfo, Record, read_record, record_identity, write_json_atomic
from vltune.runner.executor import CPU, Executor, Handle
from vltune.runner.jobs import Job
from vltune.runner.schema import SuiteError

TERMINAL = ("success", "failed", "cancelled", "skipped", "stale")
LOG_TAIL_LINES = 20


@dataclass
class Lane:
    """A pipeline stage as the scheduler sees it: its devices (GPU ids, or ``cpu``), slots per device, tasks."""

    devices: list[str | int]
    slots: int
    tasks: list[str]


class Clock:
    """Wall-clock time and sleep; the scheduling simulator (``vltune.runner.simulate``) passes a virtual one."""

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class SlotPlacement:
    """Fixed slots (the default): a device runs at most its lane's ``slots`` jobs at once; a job goes to the least
    loaded device of its lane that has a free slot.

    A placement decides where (and whether) a ready job starts; the scheduler owns order, dependencies and resume.
    ``place`` returns a device of ``devices`` or None (the job waits); ``capacity`` (slots per device) sizes the
    progress display and the per-job CPU threads.
    """

    def __init__(self, lanes: Sequence[Lane]) -> None:
        self.capacity: dict[str | int, int] = {}
        for lane in lanes:
            for d in lane.devices:
                self.capacity.setdefault(d, lane.slots)

    def place(self, state: JobState, devices: Sequence[str | int], running: Sequence[JobState]) -> str | int | None:
        load = Counter(s.handle.device for s in running)
        free = [d for d in devices if load[d] < self.capacity[d]]
        return min(free, key=lambda d: (load[d], list(devices).index(d))) if free else None

    def finished(self, state: JobState, status: str, record: dict[str, Any]) -> bool:
        """Called when a job has ended with ``status`` and its ``record`` is written; True asks the scheduler to run
        it again (a placement that retries, e.g. after running out of memory). Fixed slots never do."""
        return False


@dataclass
class JobState:
    job: Job
    status: str = "pending"  # pending | running | success | failed | cancelled | skipped | stale
    previous: bool = False  # its status comes from an earlier run
    reset: str = ""  # before it starts: "wipe" its folder (force), or drop its "result" (its train job reruns)
    handle: Handle | None = None
    wall_s: float = 0.0
    record: dict[str, Any] | None = None
    diff: list[tuple[str, Any, Any]] = field(default_factory=list)  # stale: (key, recorded value, this run's value)
    notes: dict[str, Any] = field(default_factory=dict)  # what the placement says about the run: copied into the
    # record's ``runner`` (e.g. its memory estimate, or why it is a retry)


@dataclass
class SuiteResult:
    """What a run did: each job's final state, in job order, and whether it was interrupted."""

    states: list[JobState]
    interrupted: bool = False
    counts: Counter = field(default_factory=Counter)

    @property
    def rows(self) -> list[tuple[Job, dict[str, Any] | None]]:
        return [(s.job, s.record) for s in self.states]

    def failures(self, task: str | None = None) -> list[dict[str, Any]]:
        """The failed and cancelled jobs (of ``task``), with exit code and log tail, for reports and mail."""
        out = []
        for s in self.states:
            if s.status in ("failed", "cancelled") and (task is None or s.job.task == task):
                runner = (s.record or {}).get("runner", {})
                out.append({"job": s.job.label, "status": s.status, "exit_code": runner.get("exit_code"),
                            "log_tail": runner.get("log_tail", (s.record or {}).get("error", "")),
                            "folder": s.job.out})
        return out


def log_tail(folder: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a job's stderr log, or of its stdout log when stderr is empty."""
    for name in ("stderr.log", "stdout.log", "log.txt"):
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 64 * 1024))
                text = f.read().decode("utf-8", "replace").strip()
        except OSError:
            continue
        if text:
            return "\n".join(text.splitlines()[-lines:])
    return ""


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _bare_record(job: Job, status: str, error: str) -> dict[str, Any]:
    """The record of a job that left none of its own (skipped, or ended without writing one)."""
    info = JobInfo(trainer=job.trainer, config=job.config, dataset=job.dataset, shots=job.shots, seed=job.seed,
                   phase="eval" if "--eval-only" in job.argv else "train", protocol=job.protocol, role=job.role,
                   task=job.task, grid=dict(job.grid), grid_name=job.grid_name, index=job.index,
                   subsample={"base": "base", "new": "new"}.get(job.role, "all"))
    if job.depends_on:
        info.source = os.path.relpath(job.depends_on, job.out)
    return Record(status=status, job=info, identity=job.identity, identity_hash=job.identity_hash, created_at=_now(),
                  error=error).to_dict()


def _difference(record: dict[str, Any] | None, job: Job) -> list[tuple[str, Any, Any]]:
    """How a successful record's identity differs from the job's ([] when it is this job's result)."""
    if not job.identity or not record:
        return []
    try:
        recorded = record_identity(Record.from_dict(record, os.path.join(job.out, "result.json")))
    except (TypeError, ValueError, AttributeError) as e:  # a damaged record: kept and named, never silently rerun
        return [("result.json", f"malformed ({type(e).__name__}: {e})", "this job's config")]
    return identity_diff(recorded, job.identity)


def _counts_as_done(record: dict[str, Any] | None, job: Job) -> bool:
    return bool(record) and record.get("status") == "success" and not _difference(record, job)


class Scheduler:
    """Runs ``jobs`` on ``lanes`` with ``executor``; see the module docstring for the rules."""

    def __init__(self, jobs: Sequence[Job], lanes: Sequence[Lane], executor: Executor, *, force: bool = False,
                 rerun_failed: bool = False, rerun_stale: bool = False, grace_s: float = 10.0, poll_s: float = 0.05,
                 on_event: Callable[[str, JobState], None] | None = None,
                 on_task_done: Callable[[str, SuiteResult], None] | None = None,
                 cuda_visible: Sequence[str] | None = None, cpu_count: int | None = None,
                 placement: Any = None, clock: Clock | None = None) -> None:
        self.lanes = list(lanes)
        self.clock = clock or Clock()
        self.executor = executor
        self.grace_s, self.poll_s = grace_s, poll_s
        self.on_event = on_event or (lambda kind, state: None)
        self.on_task_done = on_task_done or (lambda task, result: None)
        self.states = [JobState(j) for j in jobs]
        self.by_out = {s.job.out: s for s in self.states}
        if len(self.by_out) != len(self.states):
            raise SuiteError("two jobs share one output folder; give the tasks different names")
        self.lane_of: dict[str, Lane] = {}
        for lane in self.lanes:
            for t in lane.tasks:
                self.lane_of[t] = lane
        missing = sorted({j.task for j in jobs} - set(self.lane_of))
        if missing:
            raise SuiteError(f"tasks without a pipeline stage: {', '.join(missing)}")
        self.placement = placement or SlotPlacement(self.lanes)
        self.capacity = self.placement.capacity
        self.cuda_visible = list(cuda_visible) if cuda_visible is not None else (
            os.environ["CUDA_VISIBLE_DEVICES"].split(",") if os.environ.get("CUDA_VISIBLE_DEVICES") else None)
        self.threads = max(1, (cpu_count or os.cpu_count() or 1) // max(1, sum(self.capacity.values())))
        if hasattr(self.placement, "attach"):  # a placement that starts processes of its own (memory probes)
            self.placement.attach(self)
        self._running = False
        self._plan(force, rerun_failed, rerun_stale)

    # ---- planning -------------------------------------------------------------------------------------------
    def _plan(self, force: bool, rerun_failed: bool, rerun_stale: bool) -> None:
        for s in self.states:
            record = read_record(os.path.join(s.job.out, "result.json"))
            if force:
                s.reset = "wipe"
            elif record and record.get("status") == "success":
                s.diff = _difference(record, s.job)
                if not s.diff:
                    s.status, s.previous, s.record = "success", True, record
                elif rerun_stale:
                    s.reset = "wipe"
                else:
                    s.status, s.previous, s.record = "stale", True, record
            elif (record and record.get("status") == "failed" and not rerun_failed
                  and not _difference(record, s.job)):
                s.status, s.previous, s.record = "failed", True, record
        changed = True
        while changed:  # a job that runs again makes its dependents run again
            changed = False
            for s in self.states:
                dep = self.by_out.get(s.job.depends_on)
                if dep is not None and dep.status == "pending" and s.status in ("success", "failed") and s.previous:
                    s.status, s.previous, s.record, s.reset, changed = "pending", False, None, "result", True
        for s in self.states:
            dep = self.by_out.get(s.job.depends_on)
            if dep is not None and dep.status == "stale" and s.status == "pending":
                s.status = "skipped"
                s.record = _bare_record(s.job, "skipped", f"not run: {dep.job.label} ({dep.job.out}) holds a stale "
                                                          "result (see the stale jobs above)")
            if s.job.depends_on and s.job.depends_on not in self.by_out and s.status == "pending":
                dep_record = read_record(os.path.join(s.job.depends_on, "result.json")) or {}
                if dep_record.get("status") != "success":
                    s.status = "skipped"  # recorded when the run starts; a dry run writes nothing
                    s.record = _bare_record(s.job, "skipped", f"needs {s.job.depends_on}, which has no successful "
                                                              "result; run its task too")

    def stale_report(self) -> str:
        """Per task: how many jobs hold a finished run of a different config, and the differing keys (old → new);
        "" when none does."""
        by_task: dict[str, list[JobState]] = {}
        for s in self.states:
            if s.status == "stale":
                by_task.setdefault(s.job.task, []).append(s)
        if not by_task:
            return ""
        lines = []
        for task, states in by_task.items():
            diffs = list(dict.fromkeys(format_diff(s.diff) for s in states))
            lines.append(f"task {task!r}: {len(states)} job folders hold a finished run of a different config: "
                         + "; ".join(diffs[:3]) + (f"; … ({len(diffs) - 3} more)" if len(diffs) > 3 else ""))
            lines += [f"    {s.job.out}" for s in states[:3]] + ([f"    … and {len(states) - 3} more"]
                                                                  if len(states) > 3 else [])
        n = sum(len(v) for v in by_task.values())
        lines.append(f"These {n} jobs keep their results and were not run (nor the evaluations that need them); the "
                     "other jobs run. --rerun-stale empties and reruns exactly these jobs; or set another "
                     "base['output']['root'].")
        return "\n".join(lines)

    # ---- state changes --------------------------------------------------------------------------------------
    def _set(self, s: JobState, status: str, record: dict[str, Any] | None) -> None:
        s.status, s.record = status, record
        if not self._running:
            return
        self.on_event(status, s)
        task = s.job.task
        if all(x.status in TERMINAL for x in self.states if x.job.task == task):
            self.on_task_done(task, self.result())

    def _skip(self, s: JobState, reason: str) -> None:
        os.makedirs(s.job.out, exist_ok=True)
        s.job.write_job_file()
        record = _bare_record(s.job, "skipped", reason)
        write_json_atomic(os.path.join(s.job.out, "result.json"), record)
        self._set(s, "skipped", record)

    def _start(self, s: JobState, device: str | int) -> None:
        job = s.job
        if s.reset == "wipe" and os.path.isdir(job.out):
            shutil.rmtree(job.out)
        os.makedirs(job.out, exist_ok=True)
        record = read_record(os.path.join(job.out, "result.json"))
        if s.reset == "result" or (record is not None and record.get("status") != "success"):
            _remove(os.path.join(job.out, "result.json"))  # so the result read at the end is this run's
        job.write_job_file()
        s.status = "running"
        try:
            s.handle = self.executor.start(job, device, self.job_env(device))
        except KeyboardInterrupt:  # an in-process job was interrupted: it counts as cancelled, then the run stops
            s.handle = Handle(job=job, device=device, returncode=130, cancelled=True)
            raise
        except Exception as e:  # noqa: BLE001  (a job that cannot start is a failed job, not a crashed runner)
            s.handle = Handle(job=job, device=device, returncode=-1)
            with open(os.path.join(job.out, "stderr.log"), "a") as f:
                f.write(f"could not start {job.argv[:2]}: {type(e).__name__}: {e}\n")
        self.on_event("running", s)

    def job_env(self, device: str | int) -> dict[str, str]:
        """The variables a job on ``device`` starts with: its GPU and its share of the CPU threads."""
        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(self.threads)),
                "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", str(self.threads)),
                "CUDA_VISIBLE_DEVICES": self._visible(device)}

    def _visible(self, device: str | int) -> str:
        if device == CPU or (isinstance(device, str) and not device.isdigit()):  # no GPU id: cpu, ray, slurm:0
            return ""
        return self.cuda_visible[int(device)] if self.cuda_visible else str(device)

    def _finish(self, s: JobState) -> None:
        h = s.handle
        code = h.poll()
        s.wall_s = self.clock.time() - h.started
        path = os.path.join(s.job.out, "result.json")
        record = read_record(path)
        if code == 0 and _counts_as_done(record, s.job):
            status = "success"
        elif h.cancelled:
            status = "cancelled"
        elif record and record.get("status") in ("failed", "cancelled") and code != 0:
            status = record["status"]
        else:
            status = "failed"
        if record is None or record.get("status") != status:
            why = {0: "exited 0 without a successful result.json of the job's config"}.get(
                code, f"exit code {code}" + (" (killed by signal)" if code is not None and code < 0 else ""))
            if code == 0 and record and record.get("status") == "success":
                why = f"exited 0 with a result.json of another config ({format_diff(_difference(record, s.job))})"
            record = _bare_record(s.job, status, f"{why}; see {s.job.out}")
        record["runner"] = {"exit_code": code, "device": str(h.device), "wall_s": round(s.wall_s, 2),
                            "started_at": datetime.datetime.fromtimestamp(h.started).isoformat(timespec="seconds"),
                            "ended_at": _now(), **s.notes}
        if status != "success":
            record["runner"]["log_tail"] = log_tail(s.job.out)
        write_json_atomic(path, record)
        if not h.cancelled and self.placement.finished(s, status, record):
            s.status, s.handle, s.record = "pending", None, None
            self.on_event("retry", s)
            return
        self._set(s, status, record)

    # ---- the loop -------------------------------------------------------------------------------------------
    def running(self) -> list[JobState]:
        return [s for s in self.states if s.status == "running"]

    def load(self) -> Counter:
        """Running jobs per device."""
        return Counter(s.handle.device for s in self.running())

    def _ready(self, s: JobState) -> bool | None:
        """True: can start; False: must wait; None: can never run (its dependency did not succeed)."""
        dep = self.by_out.get(s.job.depends_on)
        if dep is None or dep.status == "success":
            return True
        return None if dep.status in TERMINAL else False

    def _schedule(self) -> None:
        for s in self.states:
            if s.status == "pending" and self._ready(s) is None:
                dep = self.by_out[s.job.depends_on]
                self._skip(s, f"not run: {dep.job.label} ({dep.job.out}) {dep.status}")
        for lane in self.lanes:
            for s in self.states:
                if s.status != "pending" or self.lane_of[s.job.task] is not lane or not self._ready(s):
                    continue
                device = self.placement.place(s, lane.devices, self.running())
                if device is None:
                    break
                self._start(s, device)

    def result(self) -> SuiteResult:
        return SuiteResult(self.states, counts=Counter(s.status for s in self.states))

    def run(self, tick: Callable[[], None] | None = None) -> SuiteResult:
        """Run until every job has ended; Ctrl-C/SIGTERM cancels this run's jobs and returns ``interrupted``."""
        self._running = True
        for s in self.states:
            if s.status == "skipped" and s.record:
                os.makedirs(s.job.out, exist_ok=True)
                s.job.write_job_file()
                write_json_atomic(os.path.join(s.job.out, "result.json"), s.record)
        for task in dict.fromkeys(s.job.task for s in self.states):  # tasks this run has nothing left to do for
            states = [x for x in self.states if x.job.task == task]
            if all(x.status in TERMINAL for x in states) and not all(x.previous for x in states):
                self.on_task_done(task, self.result())
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        interrupted = False
        try:
            while any(s.status in ("pending", "running") for s in self.states):
                for s in self.running():
                    if s.handle.poll() is not None:
                        self._finish(s)
                self._schedule()
                if tick:
                    tick()
                pending = [s for s in self.states if s.status == "pending"]
                waiting = getattr(self.placement, "waiting", lambda: False)()  # e.g. a memory probe running
                if self.running() or waiting:
                    self.clock.sleep(self.poll_s)
                elif pending:
                    raise SuiteError("no job can start: nothing runs and the placement holds back every ready job "
                                     f"(e.g. {pending[0].job.label}); check the pipeline's gpu_ids and the "
                                     "schedule settings")
        except KeyboardInterrupt:
            interrupted = True
            self.cancel()
        except BaseException:  # a bug or a bad lane: leave no job running behind the error
            self.cancel()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if hasattr(self.placement, "close"):  # end what the placement started (probes)
                self.placement.close()
        result = self.result()
        result.interrupted = interrupted
        return result

    def cancel(self) -> None:
        """End every running job's process group (SIGTERM, then SIGKILL after the grace period); record them."""
        running = self.running()
        for s in running:
            s.handle.cancelled = True
            s.handle.terminate()
        deadline = self.clock.time() + self.grace_s
        while running:
            try:
                while self.clock.time() < deadline and any(s.handle.poll() is None for s in running):
                    self.clock.sleep(self.poll_s)
                break
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
                break
        for s in running:
            if s.handle.poll() is None:
                s.handle.kill()
            self._finish(s)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
