"""``SlurmExecutor``: the runner's jobs as SLURM jobs, submitted through submitit (``executor=dict(kind="slurm")``).

SLURM queues and places the jobs; vltune keeps its own semantics on top (the ``Scheduler`` is the same as locally):

* each job is one SLURM batch job (submitit's ``SlurmExecutor``, folder ``<job folder>/slurm``: the sbatch script,
  submitit's pickles and logs beside ``result.json``) that runs the job's argv, the one ``train.py`` gets locally,
  as a child process (``stdout.log``/``stderr.log`` in the job folder, as locally), with ``--gres=gpu:N`` when
  ``gpus_per_job`` > 0 (``CUDA_VISIBLE_DEVICES`` is SLURM's), ``--cpus-per-task``, ``--mem``, ``--time``,
  ``--partition``, ``--account``, ``--requeue`` and any ``additional_parameters``; the job's id goes to
  ``<job folder>/slurm_job.json``;
* every folder is read and written by the job on a compute node and by the driver: the output root must be on a file
  system the nodes share, and the repository at the same path everywhere;
* dependencies, resume/skip, failure isolation, tables and mail stay on the driver (the ``Scheduler``); an evaluation
  is submitted once its train job has succeeded;
* state comes from ``squeue --states=all`` (one call for all of this run's jobs, at most every ``poll_s``; no
  accounting database needed), the exit code from the job's submitit result pickle;
* a job ended by someone else (``scancel``, time limit, node failure) is recorded failed and its dependents skipped;
  Ctrl-C of the driver ``scancel``s exactly this run's job ids;
* re-attach: when the driver restarts (after a crash or ``kill -9``), a job whose folder names a SLURM job that is
  still queued or running with the same argv is followed instead of submitted again;
* requeue: SLURM reruns a preempted or ``scontrol requeue``d job's batch script (``--requeue``); ``train.py`` then
  resumes from the newest checkpoint in its folder.

submitit is optional: ``pip install -r requirements-slurm.txt``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from vltune.fileio import atomic_write
from vltune.runner.executor import Handle, _parent_death_signal, spawn
from vltune.runner.jobs import Job
from vltune.runner.schema import SuiteError

SLURM_DEVICE = "slurm"  # the scheduler's device key prefix of jobs SLURM places: slurm:<stage>
INSTALL_HINT = "the slurm executor needs submitit on the driver and every node: pip install -r requirements-slurm.txt"
ID_FILE = "slurm_job.json"
KILL_WAIT_S = 5.0  # after scancel --signal=KILL, how long a job is followed before the driver lets it go
#: squeue states of a job that has not ended (it may still run, or run again)
ACTIVE = {"PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
          "RESV_DEL_HOLD": "queued", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
          "SUSPENDED": "running", "STOPPED": "running", "SIGNALING": "running", "RESIZING": "running",
          "STAGE_OUT": "running", "SPECIAL_EXIT": "queued"}

logger = logging.getLogger(__name__)


def import_submitit() -> Any:
    """``submitit``, or an ImportError that says how to install it."""
    try:
        import submitit
    except ImportError as err:
        raise ImportError(f"executor 'slurm' was chosen but submitit is not installed ({err}); "
                          f"{INSTALL_HINT}") from None
    return submitit


def run_job(argv: list[str], out: str, env: dict[str, str]) -> dict[str, Any]:
    """Body of the SLURM job: run one job as a child process (dies with this one); return its exit code."""
    threads = os.environ.get("SLURM_CPUS_PER_TASK", "1")
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **env}
    code = spawn(argv, out, env, _parent_death_signal()).wait()
    return {"returncode": code, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "restarts": os.environ.get("SLURM_RESTART_COUNT", "0")}


class SlurmQueue:
    """This run's SLURM jobs and their states, from one ``squeue`` call per ``poll_s`` for all of them."""

    def __init__(self, poll_s: float = 2.0) -> None:
        self.poll_s = poll_s
        self.ids: set[str] = set()
        self.states: dict[str, str] = {}
        self.asked: set[str] = set()  # the ids the last squeue call asked about
        self.ok = False  # the last squeue call answered
        self._last = 0.0

    def command(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def refresh(self, force: bool = False) -> None:
        if not self.ids or (not force and time.time() - self._last < self.poll_s):
            return
        self._last, self.asked = time.time(), set(self.ids)
        run = self.command(["squeue", "-h", "--states=all", "-j", ",".join(sorted(self.ids)), "-o", "%i|%T"])
        if run.returncode != 0 and "Invalid job id" not in run.stderr:
            logger.warning("squeue failed (%s); keeping the last known states", run.stderr.strip())
            self.ok = False
            return
        self.ok = True
        self.states = dict(line.split("|", 1) for line in run.stdout.split() if "|" in line)

    def state(self, job_id: str) -> str | None:
        """The job's squeue state; None when squeue does not know it (ended long ago) or could not be asked."""
        self.ids.add(job_id)
        self.refresh(force=job_id not in self.asked)
        return self.states.get(job_id)

    def lookup(self, job_id: str) -> str | None:
        """The state of a job this run did not submit (re-attach), asked now."""
        self.ids.add(job_id)
        self.refresh(force=True)
        return self.states.get(job_id) if self.ok and job_id in self.asked else None

    def forget(self, job_id: str) -> None:
        self.ids.discard(job_id)

    def scancel(self, job_id: str, *extra: str) -> None:
        run = self.command(["scancel", *extra, job_id])
        if run.returncode != 0:
            logger.warning("scancel %s failed: %s", job_id, run.stderr.strip())
        self._last = 0.0  # the next poll asks again


@dataclass
class SlurmHandle(Handle):
    """A SLURM job; ``poll()`` reads the shared ``squeue`` answer, then the job's result pickle once it has ended."""

    job_id: str = ""
    queue: SlurmQueue | None = None
    phase: str = "queued"  # queued | running (what the progress display shows)
    state: str = "PENDING"
    attached: bool = False  # followed after a driver restart instead of submitted

    def _result(self) -> dict[str, Any] | None:
        from submitit.core.utils import JobPaths, pickle_load

        path = JobPaths(os.path.join(self.job.out, "slurm"), job_id=self.job_id, task_id=0).result_pickle
        try:
            outcome, value = pickle_load(path)
        except (OSError, EOFError):
            return None
        if outcome == "success":
            return value
        return {"returncode": 1, "error": str(value)[-2000:]}

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        state = self.queue.state(self.job_id)
        if state is None and not (self.queue.ok and self.job_id in self.queue.asked):
            return None  # the controller did not answer: ask again later
        if state in ACTIVE:
            phase = ACTIVE[state]
            if phase == "running" and self.phase != "running":
                self.started = time.time()
            self.phase, self.state = phase, state
            return None
        self.state = state or "ENDED"
        result = self._result()
        if result is not None and state in (None, "COMPLETED", "FAILED"):
            self.returncode = int(result["returncode"])
            if "error" in result:
                self._note(f"slurm: job {self.job_id} raised in submitit: {result['error']}")
        else:
            self.returncode = -int(signal.SIGTERM) if state in ("CANCELLED", "PREEMPTED") else -int(signal.SIGKILL)
            self._note(f"slurm: job {self.job_id} ended {self.state} without a result (by scancel, its time limit, "
                       f"the node or memory limit); SLURM's logs: {os.path.join(self.job.out, 'slurm')}")
        self.queue.forget(self.job_id)
        return self.returncode

    def _note(self, line: str) -> None:
        with open(os.path.join(self.job.out, "stderr.log"), "a") as f:
            f.write(line + "\n")

    def terminate(self) -> None:
        """``scancel`` this job (and only it)."""
        if self.returncode is None:
            self.queue.scancel(self.job_id)

    def kill(self) -> None:
        """``scancel --signal=KILL`` it, wait up to ``KILL_WAIT_S`` for SLURM to say it ended, then stop following
        it (the scheduler kills its jobs one after another: a slow controller must not hold the driver for long)."""
        if self.returncode is not None:
            return
        self.queue.scancel(self.job_id, "--signal=KILL", "--full")
        self.queue.scancel(self.job_id)
        deadline = time.time() + KILL_WAIT_S
        while self.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        if self.returncode is None:
            self.returncode = -int(signal.SIGKILL)
            self._note(f"slurm: job {self.job_id} did not end within {KILL_WAIT_S:g} s of scancel; no longer "
                       "followed")


class SlurmExecutor:
    """Submits each job as a SLURM job through submitit; see the module docstring.

    Args:
        partition, account: sbatch ``--partition`` / ``--account`` ("" leaves the cluster's default).
        time: the time limit per job, minutes or ``"D-HH:MM:SS"``.
        gpus_per_job: GPUs per job, requested as ``--gres=gpu:N`` (0: none, for CPU clusters).
        cpus_per_task: ``--cpus-per-task`` (None: the cluster's default); the job's ``OMP_NUM_THREADS``.
        mem_gb: ``--mem`` (None: the cluster's default).
        requeue: ``--requeue``: a preempted or failed node's job is queued again and resumes from its checkpoint.
        additional_parameters: more sbatch options, e.g. ``{"qos": "high", "constraint": "a100"}``.
        repo: the repository root, put on the job's ``PYTHONPATH`` (same path on every node).
        poll_s: how often ``squeue`` is asked (one call for all of this run's jobs).

    The SLURM commands (``sbatch``, ``squeue``, ``scancel``) run with this process's environment (``SLURM_CONF``
    when the cluster's configuration is not at its default path).
    """

    def __init__(self, partition: str = "", account: str = "", time: int | str = 60, gpus_per_job: int = 1,
                 cpus_per_task: int | None = None, mem_gb: float | None = None, requeue: bool = True,
                 additional_parameters: dict[str, Any] | None = None, repo: str = "", poll_s: float = 2.0) -> None:
        self.submitit = import_submitit()
        missing = [c for c in ("sbatch", "squeue", "scancel", "srun") if shutil.which(c) is None]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise SuiteError(f"base['executor']['kind'] = 'slurm' but {', '.join(missing)} {verb} not on PATH: run "
                             "the driver on a login node of the cluster (or in an allocation), or choose kind 'local'")
        params: dict[str, Any] = {"time": time, "job_name": "vltune", "signal_delay_s": 30}
        if partition:
            params["partition"] = partition
        if account:
            params["account"] = account
        if cpus_per_task:
            params["cpus_per_task"] = int(cpus_per_task)
        if mem_gb:
            params["mem"] = f"{int(mem_gb)}GB" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}MB"
        if gpus_per_job:
            params["gres"] = f"gpu:{int(gpus_per_job)}"
        extra = {"requeue": True} if requeue else {}
        params["additional_parameters"] = {**extra, **(additional_parameters or {})}
        if repo:
            params["setup"] = [f"export PYTHONPATH={repo}${{PYTHONPATH:+:$PYTHONPATH}}"]
        self.parameters = params
        self.queue = SlurmQueue(poll_s)
        self.submitted: list[str] = []  # SLURM job ids this executor submitted
        self.attached: list[str] = []  # and those it found still queued or running and followed

    def start(self, job: Job, device: str | int, env: dict[str, str]) -> SlurmHandle:
        os.makedirs(job.out, exist_ok=True)
        env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}  # SLURM sets it on a GPU node
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the driver's share of its cores means nothing there
            if key not in os.environ:
                env.pop(key, None)
        handle = self._reattach(job, device)
        if handle is not None:
            return handle
        executor = self.submitit.SlurmExecutor(folder=os.path.join(job.out, "slurm"))
        executor.update_parameters(**self.parameters)
        submitted = executor.submit(run_job, list(job.argv), job.out, env)
        job_id = str(submitted.job_id)
        atomic_write(os.path.join(job.out, ID_FILE), json.dumps(
            {"job_id": job_id, "argv": list(job.argv), "submitted_at": time.time()}, indent=2).encode())
        self.submitted.append(job_id)
        logger.info("slurm: submitted %s as job %s", job.label, job_id)
        return SlurmHandle(job=job, device=device, job_id=job_id, queue=self.queue)

    def _reattach(self, job: Job, device: str | int) -> SlurmHandle | None:
        """A handle on the SLURM job this job's folder names, when it is still queued or running with this argv."""
        try:
            with open(os.path.join(job.out, ID_FILE)) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        if saved.get("argv") != list(job.argv):
            return None
        job_id = str(saved.get("job_id", ""))
        state = self.queue.lookup(job_id) if job_id else None
        if state not in ACTIVE:
            self.queue.forget(job_id)
            return None
        self.attached.append(job_id)
        logger.info("slurm: re-attached %s to job %s (%s)", job.label, job_id, state)
        return SlurmHandle(job=job, device=device, job_id=job_id, queue=self.queue, phase=ACTIVE[state],
                           state=state, attached=True, started=float(saved.get("submitted_at", time.time())))

    def summary(self) -> str:
        return f"slurm: {len(self.submitted)} jobs submitted, {len(self.attached)} re-attached"
