"""Warm jobs: a worker that imports the heavy modules once and forks a child per job (``WarmExecutor``).

A fresh ``python train.py`` spends seconds importing torch, open_clip, vltune, the trainers and the
datasets before its first batch. ``WarmExecutor`` starts one worker process per runner (lazily, on the first job, in
its own session, dying with the runner) that imports them once, without initialising CUDA or running a torch op
(forking is safe only then), and forks a child per job. The child becomes what a cold job would be: its own session,
a parent-death signal, stdout/stderr appended to the job's logs, the runner's environment with the job's variables,
default signal handlers, fresh random seeds and the job's thread count; then it runs the script as ``__main__`` with
the job's arguments (``runpy``), as ``python script.py args…`` does, and exits with its exit code. The worker reports
each child's pid, then its exit status, over a pipe; the runner reads it without blocking and signals the child's
process group itself, as for a local job. Jobs that are not ``python script.py args…`` with this interpreter, and
every job once the worker could not start or died, start as local jobs (logged once).
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from vltune.engine.cost import LAUNCHED_AT
from vltune.runner.executor import Handle, LocalExecutor, _launched, _parent_death_signal, _prctl, spawn
from vltune.runner.jobs import Job

#: what the warm worker imports before its first fork: vltune first (its compat shim), then the heavy libraries; the
#: entry point adds the plugin packages its script loads (parallel_runner: ``vltune.plugins.plugin_packages()``)
DEFAULT_PRELOAD = ("vltune", "torch", "open_clip")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger(__name__)


# ---- warm jobs: the runner's side -----------------------------------------------------------------------------
class WorkerGone(RuntimeError):
    """The warm worker did not start, exited, or stopped answering."""


@dataclass
class WarmHandle(Handle):
    """A job forked by the warm worker: its exit code comes from the worker; signals go to its process group
    directly (its pid, which the worker does not reap before the runner has read the exit code)."""

    pid: int = 0
    worker: Any = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.worker.returncode(self.pid)
        return self.returncode

    def signal_group(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        self.returncode = self.worker.wait(self.pid)


class _Worker:
    """The runner's end of the warm worker: starts it, asks it to fork jobs and collects their exit codes.

    Messages are JSON lines: to the worker ``run`` (a job) and ``reap`` (its exit code has been read); from it
    ``ready`` (or ``refused``), ``started`` (a pid, or an error) and ``exit`` (pid, code as ``Popen.returncode``).
    A reader thread takes the worker's messages as they come, so ``poll()`` never blocks and a Ctrl-C in the
    runner's main thread can never cut a message in half."""

    def __init__(self, script: str, preload: tuple[str, ...], env: dict[str, str], log: str | None,
                 timeout_s: float) -> None:
        boot = (f"import sys; sys.path[0] = {REPO!r}\n"
                "from vltune.runner.warm import _serve_warm_worker; _serve_warm_worker(sys.argv[1])")
        spec = json.dumps({"script": script, "preload": list(preload), "t0": time.time()})
        stderr = open(log, "ab") if log else None  # noqa: SIM115  (the worker keeps the file, this process not)
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", boot, spec], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, env=env, start_new_session=True,
                                         preexec_fn=_parent_death_signal())
        finally:
            if stderr is not None:
                stderr.close()
        self.codes: dict[int, int] = {}  # pid -> exit code, once the worker reported it
        self.replies: dict[int, dict[str, Any]] = {}
        self.hello: dict[str, Any] | None = None
        self.gone = ""  # why the worker is gone, once it is
        self.next_id = 0
        self.news = threading.Condition()
        self.writing = threading.Lock()
        self.reader = threading.Thread(target=self._read, name="vltune-warm-reader", daemon=True)
        self.reader.start()
        try:
            with self.news:
                self.news.wait_for(lambda: self.hello is not None or self.gone, timeout_s)
        except BaseException:  # e.g. Ctrl-C while the worker imports: leave no worker behind
            self.close(grace_s=0)
            raise
        if self.hello is None or self.hello["op"] != "ready":
            why = (self.hello or {}).get("why") or self.gone or f"no answer within {timeout_s:g} s"
            self.close()
            raise WorkerGone(why)

    def _send(self, **msg: Any) -> None:
        try:
            with self.writing:
                self.proc.stdin.write((json.dumps(msg) + "\n").encode())
                self.proc.stdin.flush()
        except (OSError, ValueError):  # a closed pipe: the worker is gone (the reader says why)
            pass

    def _read(self) -> None:
        """The reader thread: file the worker's messages until it closes its end (exits)."""
        buffer, why = b"", ""
        try:
            while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    with self.news:
                        if msg["op"] == "exit":
                            self.codes[msg["pid"]] = msg["code"]
                        elif msg["op"] == "started":
                            self.replies[msg["id"]] = msg
                        else:
                            self.hello = msg
                        self.news.notify_all()
                    if msg["op"] == "exit":
                        self._send(op="reap", pid=msg["pid"])  # the pid may be reused only from now on
        except (OSError, ValueError) as e:  # a closed pipe, or a garbled message: the worker cannot be trusted
            why = f"{type(e).__name__}: {e}; "
            self.proc.kill()
        code = self.proc.wait()
        with self.news:
            self.gone = f"{why}it exited (code {code})"
            self.news.notify_all()

    def run(self, script: str, args: list[str], out: str, env: dict[str, str], timeout_s: float = 300.0) -> int:
        """Fork a job; returns its pid once it runs in its own session. Raises ``WorkerGone``, or ``OSError`` when
        the worker could not fork."""
        self.next_id += 1
        ident = self.next_id
        self._send(op="run", id=ident, script=script, args=args, out=out, env=env, cwd=os.getcwd())
        with self.news:
            if not self.news.wait_for(lambda: ident in self.replies or self.gone, timeout_s):
                raise WorkerGone(f"no answer to a job within {timeout_s:g} s")
            if ident not in self.replies:
                raise WorkerGone(self.gone)
            reply = self.replies.pop(ident)
        if reply.get("fatal"):
            raise WorkerGone(reply["error"])
        if "error" in reply:
            raise OSError(reply["error"])
        return int(reply["pid"])

    def returncode(self, pid: int) -> int | None:
        """The job's exit code (negative: killed by that signal), or None while it runs."""
        if pid not in self.codes and self.gone and not _alive(pid):
            self.codes[pid] = -signal.SIGTERM  # the worker died and its parent-death signal ended the job
        return self.codes.get(pid)

    def wait(self, pid: int) -> int:
        while self.returncode(pid) is None:
            with self.news:
                self.news.wait(0.05)
        return self.codes[pid]

    def close(self, grace_s: float = 5.0) -> None:
        """Stop the worker (end of its input; SIGKILL by pid after ``grace_s``), reap it and end the reader."""
        try:
            self.proc.stdin.close()  # the worker ends any job left, then exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.reader is not threading.current_thread():
            self.reader.join(timeout=grace_s)
        self.proc.stdout.close()


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


class WarmExecutor:
    """Runs each ``python script.py args…`` job in a child forked from a warm worker; see the module docstring.

    Args:
        preload: modules the worker imports once before its first fork (besides the first script's own imports).
        log: file the worker's own stderr is appended to (import warnings, a crash); None: this process's stderr.
        start_timeout_s: how long the first job waits for the worker's imports before it starts cold instead.
    """

    def __init__(self, preload: tuple[str, ...] | list[str] = DEFAULT_PRELOAD, log: str | None = None,
                 start_timeout_s: float = 300.0) -> None:
        self.preload = tuple(preload)
        self.log = log
        self.start_timeout_s = start_timeout_s
        self.cold = LocalExecutor()
        self.worker: _Worker | None = None
        self.off = "" if sys.platform.startswith("linux") else "warm jobs need Linux (prctl, fork)"
        self._said: set[str] = set()
        atexit.register(self.close)

    def __enter__(self) -> WarmExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _say(self, key: str, text: str, level: int = logging.INFO) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.log(level, text)

    def _script(self, argv: list[str]) -> str | None:
        """The script of a ``python script.py args…`` job run by this interpreter, else None (said once)."""
        if len(argv) < 2 or not argv[1].endswith(".py") or not os.path.isfile(argv[1]):
            self._say(f"argv {argv[:1]}", f"{argv[:2]} is not 'python script.py args…': such jobs start as new "
                                          "processes")
            return None
        if os.path.abspath(argv[0]) != os.path.abspath(sys.executable):
            self._say(f"python {argv[0]}", f"{argv[0]} is not this runner's interpreter ({sys.executable}): its "
                                           "jobs start as new processes")
            return None
        return argv[1]

    def _give_up(self, why: str) -> None:
        self.off = why
        logger.warning(f"warm worker: {why}; the remaining jobs start as new processes")
        if self.worker is not None:
            self.worker.close()

    def _worker_for(self, script: str, env: dict[str, str]) -> _Worker | None:
        if self.off:
            return None
        if self.worker is None:
            # The worker imports under the jobs' thread settings (libraries read them at import); CUDA stays unset
            # there, the children get their own.
            worker_env = {**os.environ, **{k: v for k, v in env.items() if k not in ("CUDA_VISIBLE_DEVICES",
                                                                                      LAUNCHED_AT)}}
            try:
                self.worker = _Worker(script, self.preload, worker_env, self.log, self.start_timeout_s)
            except (WorkerGone, OSError) as e:
                self._give_up(f"could not start ({e})")
                return None
            hello = self.worker.hello or {}
            logger.info(f"warm worker pid {hello.get('pid')} ready: started and imported in "
                        f"{hello.get('seconds', 0):.1f} s; not imported: {hello.get('errors') or 'none'}")
        elif self.worker.gone:
            self._give_up(f"it is gone ({self.worker.gone})")
            return None
        return self.worker

    def warm_up(self, script: str, env: dict[str, str] | None = None) -> bool:
        """Start the worker now (its imports as for ``script``) instead of on the first job; True when it runs."""
        return self._worker_for(script, env or {}) is not None

    def start(self, job: Job, device: str | int, env: dict[str, str]) -> Handle:
        launched, env = _launched(env)
        script = self._script(job.argv)
        worker = self._worker_for(script, env) if script else None
        if worker is not None:
            try:
                pid = worker.run(script, job.argv[2:], job.out, {**os.environ, **env})
                return WarmHandle(job=job, device=device, started=launched, pid=pid, worker=worker)
            except WorkerGone as e:
                self._give_up(str(e))
            except OSError as e:
                logger.warning(f"warm worker could not fork {job.out} ({e}); it starts as a new process")
        return Handle(job=job, device=device, started=launched,
                      process=spawn(job.argv, job.out, env, self.cold._preexec))

    @property
    def worker_pid(self) -> int | None:
        """The warm worker's pid while it runs."""
        return self.worker.proc.pid if self.worker is not None and not self.worker.gone else None

    def close(self) -> None:
        """Stop the warm worker and reap it (idempotent; a later job starts a new one)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None


# ---- warm jobs: the worker process ----------------------------------------------------------------------------
def _serve_warm_worker(spec: str) -> None:
    """The warm worker's main: import, say ready, then fork a child per job until the runner closes the pipe."""
    _WarmWorker(json.loads(spec)).serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip tearing down torch & co.: nothing of the worker's needs it


def _noop(signum: int, frame: Any) -> None:
    pass


class _WarmWorker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.pid = os.getpid()
        # The pipes to the runner move off fds 0 and 1, so that stray prints of imported code go to the log.
        self.req, self.rep = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        self.spec = spec
        self.prctl = _prctl()  # looked up once: find_library runs ldconfig, not something to do per fork
        self.scripts: set[str] = set()
        self.live: set[int] = set()  # children whose exit is not reported yet
        self.unreaped: set[int] = set()  # reported, kept as zombies until the runner has read the code
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, _noop)  # a handler, so SIGCHLD wakes select() through the wakeup fd
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_term)

    def _send(self, **msg: Any) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(self.rep, data):]

    def _on_term(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a child between fork and its own handlers
            os._exit(128 + signum)
        self._end_children()
        os._exit(128 + signum)

    def _import(self, names: list[str]) -> list[str]:
        errors = []
        for name in names:
            try:
                __import__(name)
            except Exception as e:  # noqa: BLE001  (a job that needs it reports the error in its own log)
                errors.append(f"{name} ({type(e).__name__}: {e})")
        return errors

    def _load(self, script: str) -> list[str]:
        """Import what ``script`` imports at its top level (never run the script itself here)."""
        import ast

        if script in self.scripts:
            return []
        self.scripts.add(script)
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            with open(script, "rb") as f:
                tree = ast.parse(f.read(), script)
        except (OSError, SyntaxError, ValueError) as e:
            return [f"{script} ({type(e).__name__}: {e})"]
        names = []
        for node in tree.body:
            for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
                if isinstance(n, ast.Import):
                    names += [a.name for a in n.names]
                elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module != "__future__":
                    names.append(n.module)
        return self._import(names)

    def serve(self) -> None:
        sys.path[0] = os.path.dirname(os.path.abspath(self.spec["script"]))
        errors = self._import(self.spec["preload"]) + self._load(self.spec["script"])
        why = _fork_hazard()
        if why:
            self._send(op="refused", why=why, pid=self.pid)
            return
        # Everything imported so far lives as long as the worker: moved out of the collector's reach, a child neither
        # scans it in its collections nor in the CPU memory meter's walk over gc.get_objects() (vltune.engine.cost),
        # and its pages stay shared with the worker. The imports create no tensor, so that meter counts the same.
        gc.collect()
        gc.freeze()
        self._send(op="ready", pid=self.pid, seconds=round(time.time() - self.spec["t0"], 2), errors=errors)
        try:
            self._loop()
        finally:  # the runner closed the pipe, died, or a report could not reach it
            self._end_children()

    def _loop(self) -> None:
        buffer = b""
        while True:
            ready = select.select([self.req, self.wake_r], [], [], 1.0)[0]
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            self._report_exits()
            if self.req in ready:
                chunk = os.read(self.req, 1 << 16)
                if not chunk:
                    break  # the runner closed the pipe (or died)
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg["op"] == "run":
                        self._fork(msg)
                    elif msg["op"] == "reap" and msg["pid"] in self.unreaped:
                        self.unreaped.discard(msg["pid"])
                        os.waitpid(msg["pid"], 0)

    def _report_exits(self) -> None:
        for pid in sorted(self.live):
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is None:
                continue
            self.live.discard(pid)
            self.unreaped.add(pid)
            self._send(op="exit", pid=pid, code=info.si_status if info.si_code == os.CLD_EXITED else -info.si_status)

    def _end_children(self, grace_s: float = 5.0) -> None:
        """SIGTERM every running job's process group, SIGKILL what is left after ``grace_s``; reap them all."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.live:
                try:
                    os.killpg(pid, sig)
                except OSError:
                    pass
            deadline = time.time() + grace_s
            while self.live and time.time() < deadline:
                self.live = {pid for pid in self.live if os.waitpid(pid, os.WNOHANG)[0] == 0}
                time.sleep(0.02)
        for pid in self.unreaped:
            os.waitpid(pid, 0)
        self.unreaped.clear()

    def _fork(self, msg: dict[str, Any]) -> None:
        if msg["script"] not in self.scripts:  # a script not seen before: its imports, once, here
            self._load(msg["script"])
            why = _fork_hazard()
            if why:
                self._send(op="started", id=msg["id"], error=why, fatal=True)
                return
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(ready_r)
            os.close(ready_w)
            self._send(op="started", id=msg["id"], error=f"fork: {e}")
            return
        if pid == 0:
            os.close(ready_r)
            _child(self, ready_w, msg)  # never returns
        os.close(ready_w)
        os.read(ready_r, 1)  # end of file once the child runs in its own session (or died)
        os.close(ready_r)
        self.live.add(pid)
        self._send(op="started", id=msg["id"], pid=pid)


def _fork_hazard() -> str:
    """Why forking this process would be unsafe (CUDA initialised, Python threads running), or ""."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "an import initialised CUDA, which a forked child cannot use"
    try:
        with open("/proc/self/maps") as f:
            if any("libcuda.so" in line for line in f):
                return "an import loaded the CUDA driver (libcuda), which a forked child cannot use"
    except OSError:
        pass
    if threading.active_count() > 1:
        return f"an import started threads ({', '.join(t.name for t in threading.enumerate())})"
    return ""


def _child(worker: _WarmWorker, ready_w: int, msg: dict[str, Any]) -> None:
    """A job forked by the warm worker: become what ``spawn`` would have started, run the script, exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()  # its own process group: the runner's cancellation signals it and its children
        worker.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: it dies with the worker (which dies with the runner)
        if os.getppid() != worker.pid:
            os._exit(143)
        os.close(ready_w)
        for fd in (worker.req, worker.rep, worker.wake_r, worker.wake_w):
            os.close(fd)
        os.chdir(msg["cwd"])
        os.makedirs(msg["out"], exist_ok=True)
        for fd, name in ((1, "stdout.log"), (2, "stderr.log")):
            log = os.open(os.path.join(msg["out"], name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            os.dup2(log, fd)
            os.close(log)
        os.environ.clear()
        os.environ.update(msg["env"])
        _fresh_state(msg["env"])
        code = _run_script(msg["script"], msg["args"])
    except BaseException:  # noqa: BLE001  (whatever happens, the child never returns into the worker's loop)
        traceback.print_exc()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _fresh_state(env: dict[str, str]) -> None:
    """What a new interpreter would differ in: random seeds, and torch's thread count (read at import)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.default_generator.seed()  # the CPU generator only: CUDA's are seeded when the child initialises it
        threads = env.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))


def _run_script(script: str, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` with ``args``; its exit code as the interpreter would give it."""
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    atexit._clear()  # the worker's exit handlers are not the job's
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = int(e.code or 0)
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    return code
