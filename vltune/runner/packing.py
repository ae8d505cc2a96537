"""Memory-aware packing: start a job on a GPU of its lane when its expected peak memory fits under the budget.

Opt-in with ``base["schedule"] = dict(packing="memory", ...)`` (``vltune.runner.schema.ScheduleSettings``); fixed
slots (``SlotPlacement``) stay the default. ``MemoryPlacement`` is a placement of ``vltune.runner.scheduler``: the
scheduler keeps order, dependencies and resume, the placement only decides where (and whether) a ready job starts.

Where a job's expected peak comes from, in order:

1. **record**: finished, successful runs of the same trainer, config, dataset, shots and backbone
   (``PeakEstimator``; read from the output folder at start and updated as jobs finish). A train job's value is the
   largest ``max(train_peak_mb, eval_peak_mb)`` of the key's train runs (a train job also runs its final test, so its
   process peaks at the larger of the two); an evaluation job's is the largest ``eval_peak_mb`` of any run of the
   key. Only peaks of an accepted meter count: on GPUs the CUDA meter (``cuda_max_allocated``); a CPU meter number
   (``cpu_profiler_tensor_bytes``) is not GPU memory and is only accepted on a CPU-only run.
2. **probe**: otherwise, once per key, a short probe (``train.py`` with ``VLTUNE_PROBE_MEMORY=FILE``: the job's full
   config, one metered training step and one evaluation batch, nothing of the job's written) runs on a device of the
   lane through the scheduler's executor; the default reservation is held on that device while it runs. The
   scheduler loop is never blocked: the job waits (``place`` returns None) until the probe has ended. Trade-off: the
   lane's later jobs wait behind it too (lane order), for the probe's few seconds of start-up and one step.
3. **default**: probing off, or the probe failed: ``default_mb``, with a log line saying why.

Every estimate adds ``overhead_mb`` per process: the allocator's peak counts tensors only, while a process also holds
its CUDA context (about 300-500 MB) and the caching allocator keeps freed blocks reserved.

A job that fails with an out-of-memory error (``is_oom``) runs once more, alone on a device (nothing else starts
there until it ends), with its key's estimate raised to 1.5 x the failed attempt's (at most the largest budget);
its record's ``runner.oom_retry`` says so. A second out-of-memory failure is final. A job whose estimate exceeds
every budget also runs alone (it cannot fit better anywhere; waiting would never end), with a log line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vltune.cli import PROBE_ENV
from vltune.results.record import Record, find_records, read_record
from vltune.runner.executor import CPU
from vltune.runner.jobs import Job
from vltune.runner.scheduler import JobState, Lane, log_tail
from vltune.runner.schema import ScheduleSettings

logger = logging.getLogger(__name__)

CUDA_METER = "cuda_max_allocated"
CPU_METER = "cpu_profiler_tensor_bytes"
OOM_RAISE = 1.5  # an out-of-memory job's key is raised to this many times the failed attempt's estimate
_OOM = re.compile(r"out of memory|OutOfMemoryError", re.IGNORECASE)

Key = tuple[str, str, str, int, str]  # (trainer, config, dataset, shots, backbone)


@dataclass
class Estimate:
    """A job's expected peak memory in MB (process overhead included), where it came from and how."""

    mb: float
    source: str  # "record" | "probe" | "default"
    detail: str = ""


def job_phase(job: Job) -> str:
    return "eval" if "--eval-only" in job.argv else "train"


def job_key(job: Job) -> Key:
    """The key whose finished runs predict ``job``'s memory: trainer, config, dataset, shots, backbone."""
    backbone = job.clip_weights[0] if job.clip_weights else str(job.identity.get("MODEL.BACKBONE.NAME", ""))
    return (job.trainer, job.config, job.dataset, int(job.shots), backbone)


def record_key(record: Record) -> Key:
    backbone = str(record.identity.get("MODEL.BACKBONE.NAME", "")
                   or record.config.get("MODEL", {}).get("BACKBONE", {}).get("NAME", ""))
    return (record.job.trainer, record.job.config, record.job.dataset, int(record.job.shots), backbone)


class PeakEstimator:
    """Expected peak memory per key from finished runs' records (and from probes), plus a per-process overhead.

    Args:
        root: the output folder whose ``result.json`` records are read at start (None: none).
        overhead_mb: added to every measured peak (CUDA context and allocator slack, see the module docstring).
        methods: the meters whose peaks count: ``(CUDA_METER,)`` when packing GPUs; add ``CPU_METER`` on a
            CPU-only run.
    """

    def __init__(self, root: str | None = None, *, overhead_mb: float = 512.0,
                 methods: Iterable[str] = (CUDA_METER,)) -> None:
        self.overhead_mb = float(overhead_mb)
        self.methods = tuple(methods)
        self._train: dict[Key, tuple[float, str]] = {}  # key -> (MB, where from)
        self._eval: dict[Key, tuple[float, str]] = {}
        self._probed: dict[tuple[Key, str], tuple[float, str]] = {}
        for record in find_records(root) if root and os.path.isdir(root) else []:
            self.observe(record)

    def observe(self, record: Record | dict[str, Any], path: str = "") -> None:
        """Take a finished run's peaks into account (successful runs with an accepted meter only)."""
        if isinstance(record, dict):
            try:
                record = Record.from_dict(record, path)
            except (TypeError, ValueError, AttributeError):
                return
        if record.status != "success":
            return
        key, cost, where = record_key(record), record.cost or {}, record.path or path or "a finished run"
        train = cost.get("train_peak_mb") if cost.get("train_peak_method") in self.methods else None
        evaluation = cost.get("eval_peak_mb") if cost.get("eval_peak_method") in self.methods else None
        if record.job.phase == "train":
            peaks = [float(p) for p in (train, evaluation) if isinstance(p, (int, float))]
            if peaks and max(peaks) > self._train.get(key, (-1.0, ""))[0]:
                self._train[key] = (max(peaks), where)
        if isinstance(evaluation, (int, float)) and evaluation > self._eval.get(key, (-1.0, ""))[0]:
            self._eval[key] = (float(evaluation), where)

    def add_probe(self, job: Job, peak_mb: float, method: str) -> bool:
        """Keep a probe's measured peak for ``job``'s key and phase; False (not kept) for a meter not accepted."""
        if method not in self.methods:
            return False
        self._probed[(job_key(job), job_phase(job))] = (float(peak_mb), method)
        return True

    def lookup(self, job: Job) -> Estimate | None:
        """``job``'s estimate from records, else from a probe of its key; None when neither exists."""
        key, phase = job_key(job), job_phase(job)
        found = (self._train if phase == "train" else self._eval).get(key)
        if found:
            return Estimate(found[0] + self.overhead_mb, "record",
                            f"{phase} peak {found[0]:.0f} MB of {found[1]} + {self.overhead_mb:.0f} MB overhead")
        probed = self._probed.get((key, phase))
        if probed:
            return Estimate(probed[0] + self.overhead_mb, "probe",
                            f"probe measured {probed[0]:.0f} MB ({probed[1]}) + {self.overhead_mb:.0f} MB overhead")
        return None


def is_oom(record: Mapping[str, Any] | None, folder: str) -> bool:
    """Whether a failed job ran out of memory: torch's ``CUDA out of memory`` / ``OutOfMemoryError`` (or any "out
    of memory") in its record's error or log tail, or in the tail of its logs in ``folder``."""
    record = record or {}
    texts = [str(record.get("error", "")), str((record.get("runner") or {}).get("log_tail", "")), log_tail(folder)]
    return any(_OOM.search(t) for t in texts)


class ProbeRun(Protocol):
    def poll(self) -> bool: ...  # True once the probe has ended

    def result(self) -> tuple[float, str] | str: ...  # (peak MB, meter) or why there is none

    def stop(self) -> None: ...


class Prober(Protocol):
    def start(self, job: Job, device: str | int, env: dict[str, str]) -> ProbeRun: ...


class _ExecutorProbeRun:
    def __init__(self, handle: Any, file: str, folder: str) -> None:
        self.handle, self.file, self.folder = handle, file, folder

    def poll(self) -> bool:
        return self.handle.poll() is not None

    def result(self) -> tuple[float, str] | str:
        data = read_record(self.file)
        code = self.handle.poll()
        if code == 0 and data and isinstance(data.get("peak_mb"), (int, float)) and data.get("method"):
            return float(data["peak_mb"]), str(data["method"])
        tail = log_tail(self.folder, lines=3).replace("\n", " | ")
        return f"the probe exited {code} without a measurement (see {self.folder}: {tail})"

    def stop(self) -> None:
        if self.handle.poll() is None:
            self.handle.terminate()
            self.handle.kill()


class ExecutorProber:
    """Runs a job's probe as a separate short process through ``executor``: the job's own argv with
    ``VLTUNE_PROBE_MEMORY=<root>/<folder>/peak.json``, its logs in that folder (never in the job's)."""

    def __init__(self, executor: Any, root: str) -> None:
        self.executor, self.root = executor, root

    def start(self, job: Job, device: str | int, env: dict[str, str]) -> ProbeRun:
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(str(p) for p in (*job_key(job), job_phase(job))))
        folder = os.path.join(self.root, name)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        file = os.path.join(folder, "peak.json")
        handle = self.executor.start(dataclasses.replace(job, out=folder), device, {**env, PROBE_ENV: file})
        return _ExecutorProbeRun(handle, file, folder)


class MemoryPlacement:
    """Starts a job on the device of its lane with the most free expected memory, when its estimate fits.

    Args:
        lanes: the scheduler's lanes (their devices).
        budget_mb_per_device: MB that jobs may use per device (memory minus headroom): one number for all, or a dict.
        estimator: the ``PeakEstimator`` (records and probe results).
        default_mb: a job's estimate when no record exists and no probe measured it (overhead added).
        probe: starts probes (``ExecutorProber``); None: no probing, unknown jobs get the default.
        max_jobs_per_device: also cap the jobs per device (None: memory alone decides).
    """

    def __init__(self, lanes: Sequence[Lane], budget_mb_per_device: float | Mapping[str | int, float],
                 estimator: PeakEstimator, *, default_mb: float, probe: Prober | None = None,
                 max_jobs_per_device: int | None = None) -> None:
        devices = list(dict.fromkeys(d for lane in lanes for d in lane.devices))
        if isinstance(budget_mb_per_device, Mapping):
            self.budget = {d: float(budget_mb_per_device[d]) for d in devices}
        else:
            self.budget = dict.fromkeys(devices, float(budget_mb_per_device))
        self.estimator, self.probe, self.max_jobs = estimator, probe, max_jobs_per_device
        self.default = Estimate(float(default_mb) + estimator.overhead_mb, "default",
                                f"default {default_mb:.0f} MB + {estimator.overhead_mb:.0f} MB overhead")
        per_device = max_jobs_per_device or None
        #: how many default-sized jobs fit per device (or the job cap): sizes the progress display and CPU threads
        self.capacity: dict[str | int, int] = {
            d: per_device or max(1, int(self.budget[d] // max(self.default.mb, 1.0))) for d in devices}
        self.env_for: Callable[[str | int], dict[str, str]] = lambda device: {}
        self._reserved: dict[str, float] = {}  # running job's folder -> MB it holds
        self._alone: set[str] = set()  # folders of jobs that must run alone on a device
        self._retried: set[str] = set()  # folders already retried after running out of memory
        self._raised: dict[tuple[Key, str], float] = {}  # (key, phase) -> MB after an out-of-memory failure
        self._fallback: dict[tuple[Key, str], Estimate] = {}  # (key, phase) -> default after no/failed probe
        self._probes: dict[tuple[Key, str], tuple[ProbeRun, str | int, Job]] = {}
        self._said: set[str] = set()

    # ---- scheduler hooks ------------------------------------------------------------------------------------
    def attach(self, scheduler: Any) -> None:
        """Called by the scheduler: probes get the same environment (GPU, threads) as its jobs."""
        self.env_for = scheduler.job_env

    def waiting(self) -> bool:
        """Whether a job is held back for something that will end by itself (a memory probe running)."""
        return bool(self._probes)

    def close(self) -> None:
        """Stop the probes still running (the run ended or was cancelled)."""
        for run, _, _ in self._probes.values():
            run.stop()
        self._probes.clear()

    # ---- estimates ------------------------------------------------------------------------------------------
    def estimate(self, job: Job) -> Estimate | None:
        """``job``'s estimate as known now (records, probe, default, raised after running out of memory); None when
        its key is still to be probed."""
        key, phase = job_key(job), job_phase(job)
        est = self.estimator.lookup(job) or self._fallback.get((key, phase))
        if est is None and self.probe is None:
            est = self._fall_back(job, "probing is off (schedule probe=False)")
        raised = self._raised.get((key, phase), 0.0)
        if est is not None and raised > est.mb:
            est = Estimate(raised, est.source, f"{est.detail}; raised to {raised:.0f} MB after running out of memory")
        return est

    def _fall_back(self, job: Job, why: str) -> Estimate:
        key = (job_key(job), job_phase(job))
        self._fallback[key] = self.default
        self._say(f"memory estimate of {job.label} ({'/'.join(map(str, key[0]))}, {key[1]}): no finished run of "
                  f"its key, {why}; using the default {self.default.mb:.0f} MB")
        return self.default

    def _say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            logger.warning(line)

    # ---- placement ------------------------------------------------------------------------------------------
    def _in_use(self, running: Sequence[JobState]) -> tuple[dict[str | int, float], dict[str | int, int], set]:
        """(expected MB in use, jobs and probes running, devices held by a job running alone) per device."""
        used: dict[str | int, float] = dict.fromkeys(self.budget, 0.0)
        count: dict[str | int, int] = dict.fromkeys(self.budget, 0)
        alone = set()
        for s in running:
            d = s.handle.device
            used[d] = used.get(d, 0.0) + self._reserved.get(s.job.out, self.default.mb)
            count[d] = count.get(d, 0) + 1
            if s.job.out in self._alone:
                alone.add(d)
        for _, d, _ in self._probes.values():
            used[d] += self.default.mb
            count[d] += 1
        return used, count, alone

    def _poll_probes(self) -> None:
        for key, (run, device, job) in list(self._probes.items()):
            if not run.poll():
                continue
            del self._probes[key]
            got = run.result()
            if isinstance(got, str):
                self._fall_back(job, f"its probe failed: {got}")
            elif not self.estimator.add_probe(job, *got):
                self._fall_back(job, f"its probe measured with {got[1]}, which is not this run's meter "
                                     f"({', '.join(self.estimator.methods)})")
            else:
                logger.info(f"memory probe of {job.label} on device {device}: {got[0]:.0f} MB ({got[1]})")

    def place(self, state: JobState, devices: Sequence[str | int], running: Sequence[JobState]) -> str | int | None:
        self._poll_probes()
        job = state.job
        used, count, alone_on = self._in_use(running)
        free = {d: self.budget[d] - used[d] for d in devices}
        order = list(devices)
        est = self.estimate(job)
        if est is None:  # unknown: probe its key (once) on the device with the most room for the default
            key = (job_key(job), job_phase(job))
            if key not in self._probes:
                room = [d for d in devices if d not in alone_on and self.default.mb <= free[d] and self._below_cap(
                    count[d])]
                if not room and not any(count[d] for d in devices):
                    room = order[:1]  # the default exceeds the budget: probe on an idle device anyway
                if room:
                    d = max(room, key=lambda x: (free[x], -order.index(x)))
                    try:
                        self._probes[key] = (self.probe.start(job, d, self.env_for(d)), d, job)
                    except Exception as e:  # noqa: BLE001  (a probe that cannot start: the default, said once)
                        self._fall_back(job, f"its probe could not start ({type(e).__name__}: {e})")
            return None
        alone = job.out in self._alone
        if not alone and est.mb > max(self.budget[d] for d in devices):
            alone = True
            self._say(f"{job.label}: its estimate {est.mb:.0f} MB exceeds the budget of every device of its lane; "
                      "it runs alone on a device")
        if alone:
            fits = [d for d in devices if count[d] == 0]
        else:
            fits = [d for d in devices if d not in alone_on and est.mb <= free[d] and self._below_cap(count[d])]
        if not fits:
            return None
        d = max(fits, key=lambda x: (free[x], -order.index(x)))
        self._reserved[job.out] = est.mb
        if alone:
            self._alone.add(job.out)
        state.notes.update(memory_estimate_mb=round(est.mb, 1), memory_estimate_source=est.source)
        return d

    def _below_cap(self, n: int) -> bool:
        return self.max_jobs is None or n < self.max_jobs

    def finished(self, state: JobState, status: str, record: dict[str, Any]) -> bool:
        """Learn from a success; retry an out-of-memory failure once, alone, with its key's estimate raised."""
        job = state.job
        self._reserved.pop(job.out, None)
        self._alone.discard(job.out)
        if status == "success":
            self.estimator.observe(record, os.path.join(job.out, "result.json"))
            return False
        if status != "failed" or job.out in self._retried or not is_oom(record, job.out):
            return False
        self._retried.add(job.out)
        before = float(state.notes.get("memory_estimate_mb") or self.default.mb)
        after = round(min(before * OOM_RAISE, max(self.budget.values())), 1)
        key = (job_key(job), job_phase(job))
        self._raised[key] = max(self._raised.get(key, 0.0), after)
        self._alone.add(job.out)
        error = str(record.get("error") or "").strip() or log_tail(job.out, lines=1)
        state.notes["oom_retry"] = {"first_error": error, "estimate_mb_before": before, "estimate_mb_after": after}
        logger.warning(f"{job.label} ran out of memory ({error[:200]}); retrying it once alone on a device, its "
                       f"estimate raised {before:.0f} -> {after:.0f} MB")
        return True


PROBE_FOLDER = ".memory_probes"  # under the output root: each probe's folder (logs, peak.json)


def device_budgets(settings: ScheduleSettings, lanes: Sequence[Lane]) -> dict[str | int, float]:
    """MB jobs may use per device: ``gpu_memory_gb`` (else the GPU's total memory) minus the headroom."""
    budgets = {}
    for d in dict.fromkeys(d for lane in lanes for d in lane.devices):
        if settings.gpu_memory_gb is not None:
            total = settings.gpu_memory_gb * 1024
        else:
            import torch

            total = torch.cuda.get_device_properties(int(d)).total_memory / 2**20
        budgets[d] = total * (1 - settings.headroom)
    return budgets


def memory_placement(settings: ScheduleSettings, lanes: Sequence[Lane], output_root: str,
                     executor: Any) -> MemoryPlacement:
    """The ``MemoryPlacement`` of ``base["schedule"]``: estimates from the records under ``output_root``, probes
    through ``executor`` (in ``<output_root>/.memory_probes``). A CPU meter's peaks count only when no lane uses a
    GPU (it measures host memory, not GPU memory)."""
    cpu_only = all(d == CPU for lane in lanes for d in lane.devices)
    estimator = PeakEstimator(output_root, overhead_mb=settings.process_overhead_gb * 1024,
                              methods=(CUDA_METER, CPU_METER) if cpu_only else (CUDA_METER,))
    prober = ExecutorProber(executor, os.path.join(output_root, PROBE_FOLDER)) if settings.probe else None
    return MemoryPlacement(lanes, device_budgets(settings, lanes), estimator, default_mb=settings.default_gb * 1024,
                           probe=prober, max_jobs_per_device=settings.max_jobs_per_device)
