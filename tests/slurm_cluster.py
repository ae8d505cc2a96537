"""A real single-node SLURM cluster for the tests: this machine as controller and compute node (CPU only).

``SlurmCluster(folder).start()`` installs ``slurmctld``, ``slurmd``, the client commands and ``munge`` from the
distribution's packages when they are missing (apt-get, as root: CI's clean machine), writes ``slurm.conf`` under
``folder/etc`` (``SelectType=select/cons_tres``, free ports, state, spool, pid and log files under ``folder``), starts
``munged``, ``slurmctld`` and ``slurmd`` there (no systemd), and waits until ``sinfo`` shows the node idle.
``stop()`` ends exactly the daemons it started, by the pids their pid files name. Every client command (``sbatch``,
``squeue``, ``scancel``, submitit's calls) needs ``SLURM_CONF`` from ``env()``.

By hand (what the fixture does)::

    python tests/slurm_cluster.py /tmp/vlslurm     # starts the cluster, prints the SLURM_CONF export, waits for Ctrl-C
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procs import alive  # noqa: E402

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel", "scontrol", "srun", "munged")
MUNGE_KEY = "/etc/munge/munge.key"


class ClusterError(RuntimeError):
    """The test cluster could not be installed or started; the message carries the evidence (apt or daemon logs)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin") or name


def install_packages() -> None:
    """apt-get install the SLURM and munge packages when a command is missing; raise with apt's output if it fails."""
    if all(shutil.which(c) or os.path.exists(f"/usr/sbin/{c}") for c in COMMANDS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    run = subprocess.run(install, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        update = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        run = subprocess.run(install, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise ClusterError(f"could not install {' '.join(PACKAGES)} (needs root and a Debian/Ubuntu mirror):\n"
                               f"apt-get update: {update.stdout[-1500:]}{update.stderr[-1500:]}\n"
                               f"apt-get install: {run.stdout[-3000:]}{run.stderr[-3000:]}")


def ensure_munge_key() -> None:
    """The munge key the package normally creates; made here (1 KiB random, owned by munge) when it is missing."""
    if os.path.exists(MUNGE_KEY):
        return
    os.makedirs(os.path.dirname(MUNGE_KEY), exist_ok=True)
    with open(MUNGE_KEY, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(MUNGE_KEY, 0o400)
    shutil.chown(MUNGE_KEY, "munge", "munge")


class SlurmCluster:
    """One SLURM controller and compute node on this machine, everything under ``folder``; see the module docstring."""

    def __init__(self, folder: str, cpus: int = 2, memory_mb: int = 8000) -> None:
        self.folder = os.path.abspath(folder)
        self.cpus, self.memory_mb = cpus, memory_mb
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.folder, "etc", "slurm.conf")
        self.pidfiles = {name: os.path.join(self.folder, "run", f"{name}.pid")
                         for name in ("munged", "slurmctld", "slurmd")}
        self.pids: dict[str, int] = {}

    def env(self) -> dict[str, str]:
        """The variables a SLURM client command needs to reach this cluster."""
        return {"SLURM_CONF": self.conf}

    def _path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def write_conf(self) -> None:
        for sub in ("etc", "run", "log", "state", "spool"):
            os.makedirs(self._path(sub), exist_ok=True)
        lines = [
            "ClusterName=vltune", f"SlurmctldHost={self.host}",
            "AuthType=auth/munge", f"AuthInfo=socket={self._path('run', 'munge.socket')}", "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root", f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={self._path('state')}", f"SlurmdSpoolDir={self._path('spool')}",
            f"SlurmctldPidFile={self.pidfiles['slurmctld']}", f"SlurmdPidFile={self.pidfiles['slurmd']}",
            f"SlurmctldLogFile={self._path('log', 'slurmctld.log')}",
            f"SlurmdLogFile={self._path('log', 'slurmd.log')}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerParameters=sched_interval=1", "MinJobAge=600", "KillWait=5",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _pid(self, name: str) -> int | None:
        """The pid in the daemon's pid file (None while the file is missing or not written yet)."""
        try:
            with open(self.pidfiles[name]) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _daemon(self, name: str, argv: list[str]) -> None:
        run = subprocess.run(argv, env={**os.environ, **self.env()}, capture_output=True, text=True, timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and self._pid(name) is None:
            time.sleep(0.1)
        pid = self._pid(name)
        if pid is None:
            raise ClusterError(f"{name} did not start (exit code {run.returncode}): {run.stdout}{run.stderr}\n"
                               f"{self.logs()}")
        self.pids[name] = pid

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        install_packages()
        ensure_munge_key()
        self.write_conf()
        try:
            self._daemon("munged", [_sbin("munged"), f"--socket={self._path('run', 'munge.socket')}",
                                    f"--pid-file={self.pidfiles['munged']}", f"--key-file={MUNGE_KEY}",
                                    f"--log-file={self._path('log', 'munged.log')}",
                                    f"--seed-file={self._path('run', 'munge.seed')}", "--force"])
            self._daemon("slurmctld", [_sbin("slurmctld"), "-i"])
            self._daemon("slurmd", [_sbin("slurmd")])
            self.wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def sinfo(self) -> str:
        run = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %t %N"], env={**os.environ, **self.env()},
                             capture_output=True, text=True, timeout=30)
        return run.stdout.strip() + run.stderr.strip()

    def wait_idle(self, timeout_s: float) -> None:
        deadline, state = time.time() + timeout_s, ""
        while time.time() < deadline:
            state = self.sinfo()
            if state.split()[3:4] == ["idle"]:
                return
            time.sleep(0.5)
        raise ClusterError(f"the node did not become idle in {timeout_s:.0f} s (sinfo: {state!r})\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for name in ("munged", "slurmctld", "slurmd"):
            try:
                with open(self._path("log", f"{name}.log")) as f:
                    out.append(f"--- {name}.log\n" + "".join(f.readlines()[-lines:]))
            except OSError:
                continue
        return "\n".join(out)

    def cancel_all(self, timeout_s: float = 30.0) -> None:
        """Cancel every job of this cluster (they are all the tests') and wait until its steps have ended."""
        env = {**os.environ, **self.env()}
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30)
            if queue.returncode != 0 or not queue.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end exactly the daemons this object started (slurmd, slurmctld, munged:
        the pids their pid files under ``folder`` name, also for one that started but was not waited for), SIGKILL
        after 15 s."""
        if "slurmctld" in self.running():
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None) or self._pid(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and alive(pid):
                time.sleep(0.1)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def running(self) -> dict[str, int]:
        """The daemons of this cluster that are still alive (name -> pid)."""
        return {name: pid for name, pid in self.pids.items() if alive(pid)}


if __name__ == "__main__":
    cluster = SlurmCluster(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vlslurm").start()
    print(f"export SLURM_CONF={cluster.conf}   # then: sinfo, sbatch --wrap 'hostname', squeue", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
