"""``RayExecutor``: the runner's jobs as Ray tasks on a Ray cluster (``executor=dict(kind="ray", address=...)``).

Ray does the distribution; vltune keeps its own semantics on top (the ``Scheduler`` is the same as for local runs):

* a job is a Ray task that requests ``num_gpus = 1 / slots_per_gpu`` (fractional when several jobs share a GPU; 0 on
  a CPU cluster) and one CPU; in its Ray worker it runs the job's argv as a child process in its own session, with
  ``CUDA_VISIBLE_DEVICES`` as Ray set it for that worker, and with a parent-death signal so the job dies with its
  worker;
* the job writes its folder (logs, checkpoints, ``result.json``) under the output root, which must therefore be on
  storage every node shares (NFS, a cluster file system); the task also returns the record to the driver, which
  writes it when the driver cannot see it (no shared storage for records) and owns the tables and mail;
* dependencies, resume/skip, failure isolation and the progress display are the ``Scheduler``'s, as locally;
* a job whose worker dies (node loss, OOM kill) is retried by Ray up to ``max_retries`` times (a retried job
  resumes from its last checkpoint), then recorded failed while the suite goes on;
* cancelling (Ctrl-C) cancels only this run's tasks (``ray.cancel(force=True)``), never other drivers' work.

Ray is optional: ``pip install -r requirements-ray.txt``.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from typing import Any

from vltune.fileio import atomic_write
from vltune.runner.executor import Handle, _parent_death_signal, spawn
from vltune.runner.jobs import Job

RAY_DEVICE = "ray"  # the scheduler's device key of jobs that Ray places
INSTALL_HINT = "the ray executor needs Ray on the driver and every node: pip install -r requirements-ray.txt"


def import_ray() -> Any:
    """``ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"executor 'ray' was chosen but Ray is not installed ({err}); {INSTALL_HINT}") from None
    return ray


def run_job(argv: list[str], out: str, env: dict[str, str]) -> dict[str, Any]:
    """Body of the Ray task: run one job as a child process of this Ray worker; return its exit code and record."""
    code = spawn(argv, out, env, _parent_death_signal()).wait()
    record = None
    path = os.path.join(out, "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
    return {"returncode": code, "record": record, "worker_pid": os.getpid()}


@dataclass
class RayHandle(Handle):
    """A job submitted to Ray; ``poll()`` asks Ray without blocking."""

    ref: Any = None
    ray: Any = None
    error: str = ""

    def poll(self) -> int | None:
        if self.returncode is not None or self.ref is None:
            return self.returncode
        ready, _ = self.ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            result = self.ray.get(self.ref)
        except Exception as err:  # worker died after its retries, task cancelled, Ray lost the node
            self.error = f"{type(err).__name__}: {err}"
            self.returncode = -int(signal.SIGKILL)
            with open(os.path.join(self.job.out, "stderr.log"), "a") as f:
                f.write(f"ray: the job did not finish: {self.error}\n")
            return self.returncode
        self.returncode = int(result["returncode"])
        record, path = result.get("record"), os.path.join(self.job.out, "result.json")
        if record is not None and not os.path.isfile(path):  # the driver does not share the job's storage
            os.makedirs(self.job.out, exist_ok=True)
            atomic_write(path, json.dumps(record, indent=2).encode())
        return self.returncode

    def terminate(self) -> None:
        if self.ref is not None and self.returncode is None:
            self.ray.cancel(self.ref, force=True)

    def kill(self) -> None:
        self.terminate()
        try:
            self.ray.wait([self.ref], timeout=30)
        except Exception:  # noqa: BLE001  (the task is gone either way)
            pass
        self.poll()


class RayExecutor:
    """Submits each job as a Ray task; see the module docstring.

    Args:
        address: the cluster (``auto``, ``ray://host:10001``, ``host:6379``); empty starts a local Ray instance.
        max_retries: how often Ray re-runs a job whose worker or node died.
        slots_per_gpu: jobs per GPU; a job asks for ``1 / slots_per_gpu`` GPUs when the cluster has GPUs, else 0.
        repo: the repository root, put on the workers' ``PYTHONPATH`` (it must be at the same path on every node).
        init_kwargs: extra ``ray.init`` arguments.
    """

    def __init__(self, address: str = "auto", max_retries: int = 2, slots_per_gpu: int = 1, repo: str = "",
                 **init_kwargs: Any) -> None:
        self.ray = import_ray()
        if not self.ray.is_initialized():
            env = {"env_vars": {"PYTHONPATH": repo}} if repo else None
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=env,
                          **init_kwargs)
            self.ray.init(address=address or None, **kwargs)
        self.max_retries = int(max_retries)
        self.gpus_per_job = 1.0 / max(1, slots_per_gpu) if self.ray.cluster_resources().get("GPU", 0) else 0.0
        self._remote = self.ray.remote(run_job)

    def start(self, job: Job, device: str | int, env: dict[str, str]) -> RayHandle:
        os.makedirs(job.out, exist_ok=True)
        env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}  # Ray sets it for the worker
        ref = self._remote.options(num_cpus=1, num_gpus=self.gpus_per_job, max_retries=self.max_retries,
                                   retry_exceptions=False).remote(job.argv, job.out, env)
        return RayHandle(job=job, device=device, ref=ref, ray=self.ray)

    def cluster_slots(self) -> int:
        """How many jobs the cluster can run at once (by GPUs when jobs need them, else by CPUs)."""
        resources = self.ray.cluster_resources()
        if self.gpus_per_job > 0:
            return max(1, int(resources.get("GPU", 0) / self.gpus_per_job))
        return max(1, int(resources.get("CPU", 1)))

    def shutdown(self) -> None:
        self.ray.shutdown()
