"""``parallel_runner.py`` under faults outside the jobs: a byte-trickling SMTP server (mail never holds up a job,
never changes the exit code, and the end-of-run wait is bounded and ends at once on a signal), a read-only output
root and a full disk (one line, exit code 2, nothing already written touched). Jobs are ``tests/fakejobs.py``
processes put in place of ``expand``, so a suite takes a few seconds."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO
from fakejobs import fake_job, read_events
from procs import default_sigint
from test_mail import TrickleServer

import parallel_runner
from vltune.results.record import read_record

CONFIG = """
base = dict(data=dict(root="data"), model=dict(backbone="vltune-tiny"), output=dict(root="output"), mail={mail})
a = dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=["digits"], eval_only=True)
b = dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=["digits"], eval_only=True)
pipeline = [dict(gpu_ids=[], tasks=["a", "b"])]
"""
JOBS = [("a", "a0"), ("b", "b0"), ("b", "b1")]  # one slot: a0, then b0 (task a's mail now pending), then b1

DRIVER = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import parallel_runner
from fakejobs import fake_job

def expand(experiments, repo, only=None, hashes=True):
    jobs = [fake_job({out!r} + "/" + task, name, {events!r}, task=task, sleep=0.3) for task, name in {jobs!r}]
    for i, job in enumerate(jobs):
        job.index = i
    return jobs

parallel_runner.expand = expand
sys.exit(parallel_runner.main(["--config", {config!r}, "--plain"]))
"""


def _mail(port: int, deadline_s: float, final_wait_s: float) -> str:
    return repr(dict(enabled=True, host="127.0.0.1", port=port, security="none", sender="vltune@localhost",
                     to=["me@localhost"], timeout_s=2, deadline_s=deadline_s, final_wait_s=final_wait_s))


def _start_runner(tmp_path, mail: str) -> tuple[subprocess.Popen, str, str]:
    """The runner in its own process (real signals, a real exit) on the fake jobs; (process, output, events)."""
    (tmp_path / "configs.py").write_text(CONFIG.format(mail=mail))
    out, events = str(tmp_path / "output"), str(tmp_path / "events.jsonl")
    (tmp_path / "driver.py").write_text(DRIVER.format(repo=str(REPO), tests=str(REPO / "tests"), out=out,
                                                      events=events, jobs=JOBS, config=str(tmp_path / "configs.py")))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)
    return proc, out, events


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """The process's output lines, read on a thread so a test can wait for one with a timeout."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for_line(lines: queue.Queue, text: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no line with {text!r} within {timeout} s; output:\n{''.join(seen)}") from None
        assert line is not None, f"the runner ended without printing {text!r}:\n{''.join(seen)}"
        seen.append(line)
        if text in line:
            return seen


def _spans(events: str) -> dict[str, tuple[float, float]]:
    evs = read_events(events)
    start = {e["name"]: e["t"] for e in evs if e["event"] == "start"}
    end = {e["name"]: e["t"] for e in evs if e["event"] == "end"}
    return {n: (start[n], end.get(n, float("inf"))) for n in start}


@pytest.fixture
def trickle():
    server = TrickleServer(every_s=0.3)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.slow  # waits out a trickling SMTP server
def test_a_trickling_mail_server_holds_up_no_job_and_the_end_wait_is_bounded(tmp_path, trickle):
    deadline_s, final_wait_s = 4.0, 1.0
    proc, out, events = _start_runner(tmp_path, _mail(trickle.port, deadline_s, final_wait_s))
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    exited = time.time()
    assert proc.returncode == 0, output
    spans = _spans(events)
    assert set(spans) == {"a0", "b0", "b1"}
    # task a's mail went to the trickling server when a0 ended; it cannot finish before its deadline, yet the next
    # job started at once (a synchronous send would hold b0 until the deadline, or forever without one)
    assert trickle.connected.is_set()
    assert spans["b0"][0] - spans["a0"][1] < min(1.5, deadline_s - 1)
    assert spans["b1"][0] - spans["b0"][1] < 1.5
    assert f"waiting up to {final_wait_s:g} s for the summary mail to 127.0.0.1:{trickle.port}" in output
    # after the last job: tables, plots, then at most final_wait_s for the mail, then the process is gone
    assert exited - spans["b1"][1] < final_wait_s + 8
    log = open(os.path.join(out, "runner.log")).read()
    assert f"127.0.0.1:{trickle.port}" in log and "not sent" in log
    assert all(read_record(os.path.join(out, t, n, "result.json"))["status"] == "success" for t, n in JOBS)


@pytest.mark.slow  # signals a runner subprocess
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_end_wait_exits_at_once_and_keeps_the_suites_exit_code(tmp_path, trickle, sig):
    proc, out, _ = _start_runner(tmp_path, _mail(trickle.port, deadline_s=30, final_wait_s=60))
    try:
        lines = _lines(proc)
        _wait_for_line(lines, "waiting up to 60 s for the summary mail", timeout=60)
        proc.send_signal(sig)
        sent = time.monotonic()
        proc.wait(timeout=10)
        assert time.monotonic() - sent < 3
    finally:
        proc.kill()
    assert proc.returncode == 0  # every job succeeded: a signal during the mail wait is not an interrupted suite
    assert all(read_record(os.path.join(out, t, n, "result.json"))["status"] == "success" for t, n in JOBS)
    log = open(os.path.join(out, "runner.log")).read()
    assert f"mail to 127.0.0.1:{trickle.port}" in log and "a signal ended the wait" in log


# ---------------------------------------------------------------------------------------------------- storage


@pytest.fixture
def suite(tmp_path, monkeypatch):
    """(run, output root, events): ``run()`` is ``parallel_runner.main`` in this process on three fake jobs
    without mail."""
    (tmp_path / "configs.py").write_text(CONFIG.format(mail="None"))
    out, events = str(tmp_path / "output"), str(tmp_path / "events.jsonl")

    def expand(experiments, repo, only=None, hashes=True):
        jobs = [fake_job(os.path.join(out, task), name, events, task=task) for task, name in JOBS]
        for i, job in enumerate(jobs):
            job.index = i
        return jobs

    monkeypatch.setattr(parallel_runner, "expand", expand)
    return (lambda: parallel_runner.main(["--config", str(tmp_path / "configs.py"), "--plain"])), out, events


def _snapshot(root: str) -> dict[str, bytes]:
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return files


def _under(path: object, root: str) -> bool:
    if isinstance(path, int):
        return False
    return os.path.abspath(os.fsdecode(path)).startswith(root + os.sep) or os.path.abspath(os.fsdecode(path)) == root


def _read_only(monkeypatch, root: str) -> None:
    """Make ``root`` behave like a read-only mount: every write, create, rename or delete under it fails with
    EROFS (tests run as root, which ignores permission bits, and cannot mount)."""

    def erofs(path: object) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_os_open, real_makedirs = builtins.open, os.open, os.makedirs

    def fake_open(file, mode="r", *args, **kwargs):
        if _under(file, root) and any(c in mode for c in "wax+"):
            raise erofs(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if _under(path, root) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            raise erofs(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_makedirs(name, mode=0o777, exist_ok=False):
        if _under(name, root) and not (exist_ok and os.path.isdir(name)):
            raise erofs(name)
        return real_makedirs(name, mode, exist_ok)

    def refuse(real):
        def fake(path, *args, **kwargs):
            if _under(path, root):
                raise erofs(path)
            return real(path, *args, **kwargs)
        return fake

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "makedirs", fake_makedirs)
    for name in ("mkdir", "replace", "rename", "remove", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_a_read_only_output_root_ends_in_one_line_and_exit_code_2(suite, monkeypatch, capsys):
    run, out, events = suite
    assert run() == 0
    before = _snapshot(out)
    capsys.readouterr()
    _read_only(monkeypatch, out)
    assert run() == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {out}") and "read-only" in line and "base['output']['root']" in line
    monkeypatch.undo()
    assert _snapshot(out) == before  # every result.json, table, plot and log byte for byte


def test_a_full_disk_while_writing_the_report_ends_in_one_line_and_exit_code_2(suite, monkeypatch, capsys):
    run, out, events = suite
    assert run() == 0
    keep = {k: v for k, v in _snapshot(out).items() if k.endswith(("result.json", "report.md", ".csv", ".png"))}
    capsys.readouterr()
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:  # a full disk surfaces when the written bytes are flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    assert run() == 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {out}") and "disk is full" in line and "free space" in line
    after = _snapshot(out)
    assert {k: after.get(k) for k in keep} == keep  # nothing already written was damaged
    assert not [k for k in after if os.path.basename(k).startswith(".tmp-")]  # no half-written temporary left
    assert json.loads(keep[os.path.join("a", "a0", "result.json")])["status"] == "success"
