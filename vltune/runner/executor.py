"""How a job runs: ``WarmExecutor`` (the runner's default: a child forked from a warm worker per job),
``LocalExecutor`` (a fresh interpreter per job) and ``InlineExecutor`` (in this process, one at a time: tests and
``--debug``).

Every job is an argv list, never a shell string. A local job gets ``CUDA_VISIBLE_DEVICES`` set to its GPU (empty on
the CPU) and ``OMP_NUM_THREADS`` set to its share of the cores unless the user set it, plus ``VLTUNE_JOB_LAUNCHED_AT``
(the time it was started, for the record's ``cost.startup_s``). Its stdout and stderr go to ``stdout.log`` and
``stderr.log`` in its folder. It runs in its own session (process group), which is what the runner signals to cancel
it. On Linux a job also dies with the runner (parent-death signal), so a killed runner leaves no orphan that keeps
writing into the output folder.

The warm worker is ``vltune.runner.warm``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from vltune.engine.cost import LAUNCHED_AT
from vltune.logs import setup_logging
from vltune.runner.jobs import Job

CPU = "cpu"  # the device key of jobs that run without a GPU

logger = logging.getLogger(__name__)


@dataclass
class Handle:
    """A started job: ``poll()`` gives its exit code once it has ended."""

    job: Job
    device: str | int
    started: float = field(default_factory=time.time)
    process: subprocess.Popen | None = None
    returncode: int | None = None
    cancelled: bool = False

    def poll(self) -> int | None:
        if self.returncode is None and self.process is not None:
            self.returncode = self.process.poll()
        return self.returncode

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the job's whole process group (the job and, e.g., its data-loader workers)."""
        if self.process is not None and self.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """Ask the job to stop (SIGTERM to its process group): it records itself cancelled."""
        self.signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """Stop the job now (SIGKILL to its process group) and wait for it."""
        self.signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()


class Executor(Protocol):
    def start(self, job: Job, device: str | int, env: dict[str, str]) -> Handle: ...


def _prctl() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl


def _parent_death_signal() -> Any:
    """A pre-exec function that makes the child get SIGTERM when the runner dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died between fork and prctl
            os._exit(143)

    return preexec


def _launched(env: dict[str, str]) -> tuple[float, dict[str, str]]:
    """(now, ``env`` with the launch time the job's record measures its start-up from)."""
    now = time.time()
    return now, {**env, LAUNCHED_AT: f"{now:.6f}"}


def spawn(argv: list[str], out: str, env: dict[str, str], preexec: Any = None) -> subprocess.Popen:
    """Start ``argv`` in its own session (process group) with ``env`` over this environment, stdout and stderr
    appended to ``out/stdout.log`` and ``out/stderr.log``; ``preexec``: e.g. ``_parent_death_signal()``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stdout.log"), "ab") as stdout, open(os.path.join(out, "stderr.log"), "ab") as stderr:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env={**os.environ, **env}, start_new_session=True, preexec_fn=preexec)


class LocalExecutor:
    """Runs each job as a child process in its own session (process group)."""

    def __init__(self) -> None:
        self._preexec = _parent_death_signal()

    def start(self, job: Job, device: str | int, env: dict[str, str]) -> Handle:
        launched, env = _launched(env)
        return Handle(job=job, device=device, started=launched, process=spawn(job.argv, job.out, env, self._preexec))


class InlineExecutor:
    """Runs a ``python script.py args…`` job in this process by calling ``script.main(args, console=False)``.

    One job at a time and no isolation: for tests and ``--debug``, where a fresh interpreter per job costs more
    than the job. Exceptions that escape the script count as exit code 1.
    """

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}

    def _main(self, script: str) -> Any:
        if script not in self._modules:
            spec = importlib.util.spec_from_file_location(f"vltune_inline_{len(self._modules)}", script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._modules[script] = module
        return self._modules[script].main

    def start(self, job: Job, device: str | int, env: dict[str, str]) -> Handle:
        if len(job.argv) < 2 or not job.argv[1].endswith(".py"):
            raise ValueError(f"InlineExecutor runs 'python script.py args…' jobs only; got {job.argv[:3]}")
        os.makedirs(job.out, exist_ok=True)
        handle = Handle(job=job, device=device)
        try:
            handle.returncode = int(self._main(job.argv[1])(job.argv[2:], console=False) or 0)
        except SystemExit as e:
            handle.returncode = e.code if isinstance(e.code, int) else 1
            with open(os.path.join(job.out, "stderr.log"), "a") as f:
                f.write(f"{e}\n")
        except Exception as e:  # noqa: BLE001  (a crashing job is a failed job, not a crashed runner)
            handle.returncode = 1
            with open(os.path.join(job.out, "stderr.log"), "a") as f:
                f.write(f"{type(e).__name__}: {e}\n")
        finally:
            setup_logging(console=False)  # detach the job's log.txt so later lines do not land in it
        if handle.returncode == 130:  # the job caught Ctrl-C and recorded itself cancelled: stop the run too
            raise KeyboardInterrupt
        return handle
