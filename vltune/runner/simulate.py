"""A simulator of the runner's scheduler: the real ``Scheduler`` (order, dependencies, lanes, placement, retries) on
simulated jobs and simulated GPUs, in virtual time.

* ``SimJob``: a real ``vltune.runner.jobs.Job`` plus what the simulation needs of it: how long it runs
  (``startup_s`` + ``duration_s``) and its peak GPU memory (``peak_mb``), held for the whole run.
* ``SimExecutor``: starts a job by noting its end time; its ``Handle.poll()`` gives 0 once the virtual clock has
  reached that end, after writing the job's successful ``result.json`` (its identity, like a real ``train.py`` run,
  and ``cost.train_peak_mb`` or ``cost.eval_peak_mb``). A GPU has ``memory_mb``: a job whose peak would take the
  jobs running on its device over that fails after its start-up with a ``CUDA out of memory`` record (exit code 1),
  which is how a real run that packs too much ends, so a placement's out-of-memory retry is exercised.
* ``VirtualClock``: time moves only in ``sleep``, and jumps straight to the next job end (at most ``max_jump_s``),
  so a 1,000-job suite of hours of GPU time simulates in seconds.
* ``BarrierPlacement``: the Skip Tuning runner's policy (``parallel_runner.py`` with ``utils/gpu_allocater_v2.py``)
  as a placement, for comparison.
* ``TablePeaks``: an estimator for ``vltune.runner.packing.MemoryPlacement`` that knows each simulated job's peak.
* ``simulate``: runs the scheduler over the jobs in a temporary folder (the scheduler writes ``job.json`` and
  ``result.json`` as in a real run) and reports makespan, memory-weighted utilisation, idle GPU time and each
  job's start and end.

Compute sharing: a job's ``compute`` is the fraction of a GPU it keeps busy when it runs alone (0: it never slows
another job down; 1: it saturates the GPU). While the jobs computing on a device sum to more than 1, each advances
at 1/sum of its own speed (the GPU's time is shared fairly); start-up is CPU work and is never slowed. Simulating the
same suite at ``compute`` 0 and 1 brackets what packing gains: the first only counts memory, the second assumes every
job saturates its GPU alone.

Simplifications: a job's peak is held from its start to its end; only the job that would overcommit a device fails
(the jobs already running are unaffected); the failed attempt occupies its device for its start-up time.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vltune.results.record import write_json_atomic
from vltune.runner.executor import Handle
from vltune.runner.jobs import Job
from vltune.runner.packing import Estimate, PeakEstimator, job_key, job_phase
from vltune.runner.scheduler import TERMINAL, Clock, JobState, Lane, Scheduler, SlotPlacement

OOM_MESSAGE = "CUDA out of memory."
SECOND_PHASE_ROLES = ("new", "target", "variant")  # upstream runs these after a `wait` barrier


class VirtualClock(Clock):
    """Simulated time: ``time()`` only moves when the scheduler sleeps. A sleep ends at the next event
    ``next_event()`` names (a simulated job's start-up ending or its work finishing, as projected now) when one is
    due, capped at ``max_jump_s``, else after the requested seconds."""

    def __init__(self, start: float = 0.0, max_jump_s: float = 3600.0,
                 next_event: Callable[[], float | None] = lambda: None) -> None:
        self.now = start
        self.max_jump_s = max_jump_s
        self.next_event = next_event

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        due = self.next_event()
        if due is not None and due > self.now:
            self.now = min(due, self.now + self.max_jump_s)
        else:
            self.now += seconds


@dataclass
class SimJob:
    """A job of the suite and its simulated cost: start-up, then ``duration_s`` holding ``peak_mb`` on its GPU."""

    job: Job
    duration_s: float
    peak_mb: float = 0.0
    startup_s: float = 0.0
    compute: float = 0.0  # the fraction of a GPU it keeps busy alone (module docstring: compute sharing)


@dataclass
class Attempt:
    """One start of a job on a device: when it started and ended, and whether it ran out of memory."""

    out: str
    label: str
    device: str | int
    start: float
    end: float  # projected while it runs (compute sharing moves it), final once it has ended
    peak_mb: float
    oom: bool = False
    compute: float = 0.0
    work_s: float = 0.0  # seconds of work left at full speed, after start-up
    start_work: float = 0.0  # when its start-up ends and its GPU work begins
    done: bool = False


@dataclass
class SimHandle(Handle):
    """A simulated job's handle: it ends when the virtual clock reaches ``attempt.end``."""

    attempt: Attempt | None = None
    clock: VirtualClock | None = None
    on_end: Callable[[SimHandle], None] | None = None

    executor: SimExecutor | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.executor.advance(self.device)
            if self.attempt.done:
                self.returncode = 1 if self.attempt.oom else 0
                self.on_end(self)
        return self.returncode


class SimExecutor:
    """Starts simulated jobs on ``gpus`` GPUs of ``memory_mb`` each (device ids 0..gpus-1)."""

    def __init__(self, specs: dict[str, SimJob], clock: VirtualClock, memory_mb: float) -> None:
        self.specs, self.clock, self.memory_mb = specs, clock, memory_mb
        self.attempts: list[Attempt] = []
        self._live: dict[str | int, list[Attempt]] = {}
        self._synced: dict[str | int, float] = {}

    def used_mb(self, device: str | int) -> float:
        """The peaks of the jobs running on ``device`` now."""
        self.advance(device)
        return sum(a.peak_mb for a in self._live.get(device, []) if not a.oom)

    def advance(self, device: str | int) -> None:
        """Bring the work of ``device``'s attempts up to now, event by event (an attempt's start-up ending, one
        finishing), at the shared speed in force between events; then project their ends and register them."""
        now = self.clock.time()
        t = self._synced.get(device, now)
        live = self._live.get(device, [])
        while live and t < now:
            computing = [a for a in live if a.start_work <= t]
            speed = _speed(computing)
            step_to = min([now, *(a.start_work for a in live if a.start_work > t),
                           *(t + a.work_s / speed for a in computing)])
            for a in computing:
                a.work_s -= (step_to - t) * speed
            t = step_to
            for a in computing:
                if a.work_s <= 1e-9:
                    a.work_s, a.done, a.end = 0.0, True, t
            live = [a for a in live if not a.done]
        self._synced[device] = now
        self._live[device] = live
        speed = _speed([a for a in live if a.start_work <= now])
        for a in live:
            a.end = max(a.start_work, now) + a.work_s / speed

    def next_event(self) -> float | None:
        """The soonest projected event of any device after now: an attempt's start-up ending or its work ending."""
        now = self.clock.time()
        times = [t for live in self._live.values() for a in live for t in (a.start_work, a.end) if t > now]
        return min(times, default=None)

    def start(self, job: Job, device: str | int, env: dict[str, str]) -> Handle:
        spec = self.specs[job.out]
        now = self.clock.time()
        oom = self.used_mb(device) + spec.peak_mb > self.memory_mb
        attempt = Attempt(job.out, job.label, device, now, now + spec.startup_s, spec.peak_mb, oom,
                          compute=0.0 if oom else spec.compute, work_s=0.0 if oom else spec.duration_s,
                          start_work=now + spec.startup_s)
        self.attempts.append(attempt)
        self._live.setdefault(device, []).append(attempt)
        self.advance(device)
        return SimHandle(job=job, device=device, started=now, attempt=attempt, clock=self.clock,
                         on_end=self._write_result, executor=self)

    def _write_result(self, handle: SimHandle) -> None:
        job, a = handle.job, handle.attempt
        spec = self.specs[job.out]
        train = "--eval-only" not in job.argv
        cost = {"startup_s": spec.startup_s, ("train_time_s" if train else "eval_time_s"): spec.duration_s,
                ("train_peak_mb" if train else "eval_peak_mb"): spec.peak_mb}
        record: dict[str, Any] = {"schema": 2, "status": "failed" if a.oom else "success", "identity": job.identity,
                                  "identity_hash": job.identity_hash, "cost": cost,
                                  "job": {"trainer": job.trainer, "dataset": job.dataset, "role": job.role,
                                          "task": job.task, "seed": job.seed, "shots": job.shots,
                                          "protocol": job.protocol, "phase": "train" if train else "eval"}}
        if a.oom:
            used = self.used_mb(a.device)
            record["error"] = (f"{OOM_MESSAGE} Tried to allocate {spec.peak_mb:.0f} MiB (GPU {a.device}; "
                               f"{self.memory_mb:.0f} MiB total capacity; {used:.0f} MiB in use by other jobs)")
        else:
            record["metrics"] = {"accuracy": 0.0}
        write_json_atomic(os.path.join(job.out, "result.json"), record)


def _speed(computing: Sequence[Attempt]) -> float:
    """The speed of each computing job on a device: full while their ``compute`` sums to at most 1, else shared."""
    load = sum(a.compute for a in computing)
    return 1.0 if load <= 1.0 else 1.0 / load


class BarrierPlacement:
    """The Skip Tuning runner's policy, as a placement for the real scheduler.

    What upstream does (``parallel_runner.py``, ``utils/gpu_allocater_v2.py``): each pipeline (a list of GPU ids and
    its tasks) runs in its own process, side by side; a pipeline runs its tasks one after another, and
    ``GPUAllocater.run`` returns only when every GPU of the pipeline is free again, so a task starts after the whole
    previous task has ended. A base-to-new task is one command list: every train command, a ``wait`` command, then
    every eval command; ``wait`` holds the list until all of the pipeline's GPUs are free. Commands start in list
    order, one per free GPU (a GPU is busy while its one command runs), on the first free GPU, 1 s apart.

    Modelled: one job per GPU, on the first free GPU of the lane; jobs start in upstream's command order
    (``BarrierPlacement.order``, which ``simulate`` applies: per task, train jobs dataset by dataset, then the
    evaluations); a job of a task starts only when every job
    of the lane's earlier tasks has ended, and a second-phase job (``role`` new, target or variant: upstream's
    commands after ``wait``) only when every first-phase job of its task has ended. The first job that must wait
    blocks every later job of its lane, as upstream's list does. Not modelled: the 1 s between launches, and that
    upstream stops the whole task at its first failed command.

    The scheduler calls ``attach(scheduler)``: the barrier reads every job's state.
    """

    def __init__(self, lanes: Sequence[Lane]) -> None:
        self.capacity: dict[str | int, int] = {d: 1 for lane in lanes for d in lane.devices}
        self.lanes = list(lanes)
        self._states: list[JobState] | None = None
        self._key: tuple[int, ...] | None = None
        self._counts: Counter = Counter()

    def attach(self, scheduler: Scheduler) -> None:
        self._states = scheduler.states

    def _unfinished(self, running: Sequence[JobState]) -> Counter:
        """Jobs not yet ended per (task, first phase?); recounted only when the running set has changed (every job
        ends or is skipped through a change of it), so a long suite stays fast."""
        key = tuple(id(s) for s in running)
        if key != self._key:
            self._key = key
            self._counts = Counter((s.job.task, s.job.role not in SECOND_PHASE_ROLES) for s in self._states
                                   if s.status not in TERMINAL)
        return self._counts

    def _blocked(self, state: JobState, running: Sequence[JobState]) -> bool:
        lane = next(ln for ln in self.lanes if state.job.task in ln.tasks)
        counts = self._unfinished(running)
        if any(counts[(t, first)] for t in lane.tasks[:lane.tasks.index(state.job.task)] for first in (True, False)):
            return True
        return state.job.role in SECOND_PHASE_ROLES and counts[(state.job.task, True)] > 0

    @staticmethod
    def order(jobs: Sequence[SimJob]) -> list[SimJob]:
        """``jobs`` in upstream's command order: per task, the first-phase jobs, then the second-phase ones, each
        dataset by dataset (then seed), as ``get_base_to_new_commands`` lists them. (vltune's order puts each
        evaluation right after its train job, which a first-in-first-out barrier would stall on.)"""
        tasks = {t: i for i, t in enumerate(dict.fromkeys(sj.job.task for sj in jobs))}
        datasets = {d: i for i, d in enumerate(dict.fromkeys(sj.job.dataset for sj in jobs))}
        return sorted(jobs, key=lambda sj: (tasks[sj.job.task], sj.job.role in SECOND_PHASE_ROLES,
                                            datasets[sj.job.dataset], sj.job.seed))

    def place(self, state: JobState, devices: Sequence[str | int], running: Sequence[JobState]) -> str | int | None:
        if self._states is None:
            raise RuntimeError("BarrierPlacement needs the scheduler's job states: call placement.attach(scheduler) "
                               "before scheduler.run()")
        if self._blocked(state, running):
            return None
        busy = {s.handle.device for s in running}
        return next((d for d in devices if d not in busy), None)

    def finished(self, state: JobState, status: str, record: dict[str, Any]) -> bool:
        return False


class TablePeaks(PeakEstimator):
    """A ``PeakEstimator`` that knows every simulated job's peak, as if each key had finished before: the estimate
    of a job is its ``SimJob.peak_mb`` × ``scale`` (the largest over the jobs of its key and phase, as records give).
    ``peak_mb`` is the whole process's footprint, so no overhead is added; ``scale`` < 1 makes the estimates too low
    (the simulated GPUs then run out of memory and the placement's retry runs)."""

    def __init__(self, jobs: Sequence[SimJob], scale: float = 1.0) -> None:
        super().__init__(None, overhead_mb=0.0)
        self.peaks: dict[tuple[Any, str], float] = {}
        for sj in jobs:
            key = (job_key(sj.job), job_phase(sj.job))
            self.peaks[key] = max(self.peaks.get(key, 0.0), sj.peak_mb * scale)

    def observe(self, record: Any, path: str = "") -> None:
        """Finished simulated runs teach nothing new: the table already holds every key's peak."""

    def lookup(self, job: Job) -> Estimate | None:
        mb = self.peaks.get((job_key(job), job_phase(job)))
        return None if mb is None else Estimate(mb, "record", f"simulated table peak {mb:.0f} MB")


@dataclass
class SimReport:
    """What a simulated run did. ``utilisation``: the successful jobs' peak MB × run seconds over the GPUs'
    MB × makespan; ``idle_s``: GPU-seconds with no job on the GPU; ``jobs``: each attempt's device, start and end."""

    makespan_s: float
    utilisation: float
    idle_s: float
    gpus: int
    memory_mb: float
    counts: Counter = field(default_factory=Counter)
    oom_attempts: int = 0
    jobs: list[Attempt] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"makespan_s": round(self.makespan_s, 1), "makespan_h": round(self.makespan_s / 3600, 3),
                "utilisation": round(self.utilisation, 4), "idle_gpu_h": round(self.idle_s / 3600, 3),
                "oom_attempts": self.oom_attempts, "counts": dict(self.counts)}


def _rebase(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip(os.sep)) if path else ""


def _idle(attempts: Sequence[Attempt], devices: Sequence[str | int], makespan: float) -> float:
    idle = 0.0
    for d in devices:
        busy, covered_to = 0.0, 0.0
        for a in sorted((a for a in attempts if a.device == d), key=lambda a: a.start):
            lo, hi = max(a.start, covered_to), max(a.end, covered_to)
            busy += hi - lo
            covered_to = hi
        idle += makespan - busy
    return idle


def simulate(jobs: Sequence[SimJob], lanes: Sequence[Lane], placement: Callable[[Sequence[Lane]], Any] | None = None,
             *, memory_mb: float, root: str | None = None, max_jump_s: float = 3600.0) -> SimReport:
    """Run ``jobs`` through the real scheduler on ``lanes`` (GPU ids as devices) in virtual time.

    ``placement``: a factory ``lanes -> placement`` (``SlotPlacement``, ``BarrierPlacement``, a packing policy);
    default fixed slots. A factory with an ``order`` function (``BarrierPlacement``) reorders the jobs first.
    Job folders (``Job.out``, ``depends_on``) are re-rooted under ``root`` (default: a new temporary folder, removed
    afterwards), so a simulation never touches a real output folder."""
    if root is None:
        with tempfile.TemporaryDirectory(prefix="vltune-sim-") as tmp:
            return simulate(jobs, lanes, placement, memory_mb=memory_mb, root=tmp, max_jump_s=max_jump_s)
    jobs = placement.order(jobs) if hasattr(placement, "order") else jobs
    rebased = [replace(sj, job=replace(sj.job, out=_rebase(root, sj.job.out),
                                       depends_on=_rebase(root, sj.job.depends_on))) for sj in jobs]
    clock = VirtualClock(max_jump_s=max_jump_s)
    executor = SimExecutor({sj.job.out: sj for sj in rebased}, clock, memory_mb)
    clock.next_event = executor.next_event
    policy = (placement or SlotPlacement)(lanes)
    scheduler = Scheduler([sj.job for sj in rebased], lanes, executor, placement=policy, clock=clock, poll_s=1.0,
                          cpu_count=1)
    result = scheduler.run()
    makespan = max((a.end for a in executor.attempts), default=0.0)
    devices = list(dict.fromkeys(d for lane in lanes for d in lane.devices))
    useful = sum(a.peak_mb * (a.end - a.start) for a in executor.attempts if not a.oom)
    capacity = len(devices) * memory_mb * makespan
    by_root = {sj.job.out: sj.job.out[len(root):] for sj in rebased}
    attempts = [replace(a, out=by_root[a.out]) for a in executor.attempts]
    return SimReport(makespan_s=makespan, utilisation=useful / capacity if capacity else 0.0,
                     idle_s=_idle(executor.attempts, devices, makespan), gpus=len(devices), memory_mb=memory_mb,
                     counts=result.counts, oom_attempts=sum(a.oom for a in executor.attempts), jobs=attempts)


__all__ = ["Attempt", "BarrierPlacement", "SimExecutor", "SimHandle", "SimJob", "SimReport", "TablePeaks",
           "VirtualClock", "simulate"]
