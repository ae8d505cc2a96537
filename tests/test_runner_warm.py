"""The warm executor: what only a forked job can get wrong. Each job is a session of its own with its environment,
thread count, fresh random seeds and logs; a crashing job ends alone; jobs that cannot go warm, a worker that cannot
fork safely and a worker that dies fall back to fresh interpreters; closing stops the worker; the default worker
never initialises CUDA; a real ``train.py`` job gives the cold job's result, and records its start-up.

The scheduler behaviour that must not depend on the executor (slots, devices, failures, resume, Ctrl-C, SIGTERM,
kill -9 of the runner) is tested with both executors in ``test_runner.py``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import pytest
from conftest import REPO
from procs import alive
from test_runner import _wait_for

import parallel_runner
from vltune.engine.cost import LAUNCHED_AT, CostMeter
from vltune.runner.executor import Handle, InlineExecutor, LocalExecutor
from vltune.runner.jobs import Job
from vltune.runner.schema import SuiteError, load_experiments
from vltune.runner.warm import WarmExecutor, WarmHandle

# A job that reports what it is, then does what its first argument says.
PROBE = """
import gc, json, os, random, sys, time
import torch
print("to stdout"); print("to stderr", file=sys.stderr)
with open(sys.argv[1], "w") as f:
    json.dump(dict(pid=os.getpid(), ppid=os.getppid(), sid=os.getsid(0), pgrp=os.getpgrp(), argv=sys.argv[1:],
                   name=__name__, cwd=os.getcwd(), stdin=sys.stdin.read(), env={k: os.environ.get(k) for k in
                   ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "VLTUNE_JOB_LAUNCHED_AT", "ONLY_IN_RUNNER")},
                   threads=torch.get_num_threads(), cuda=torch.cuda.is_initialized(), random=random.random(),
                   torch_random=torch.rand(1).item(), modules=sorted(m for m in ("open_clip", "trainers", "datasets",
                   "vltune") if m in sys.modules), frozen=gc.get_freeze_count()), f)
action = sys.argv[2] if len(sys.argv) > 2 else ""
if action == "raise":
    raise ValueError("a job that crashes")
if action == "message":
    sys.exit("a job that exits with a message")
if action.startswith("exit"):
    sys.exit(int(action[4:]))
if action == "killed":
    os.kill(os.getpid(), 9)
if action.startswith("sleep"):
    time.sleep(float(action[5:]))
if action == "stubborn":
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
"""


def _script(folder, name: str, text: str) -> str:
    path = folder / f"{name}.py"
    path.write_text(text)
    return str(path)


def _job(tmp_path, name: str, *args: str, python: str = sys.executable) -> Job:
    # written once: rewriting it while an earlier job's child reads it could hand that child an empty script
    probe = str(tmp_path / "probe.py") if (tmp_path / "probe.py").exists() else _script(tmp_path, "probe", PROBE)
    out = tmp_path / name
    return Job(task="t", out=str(out), argv=[python, probe, str(tmp_path / f"{name}.json"), *args])


def _wait(handle: Handle, timeout: float = 30.0) -> int:
    _wait_for(lambda: handle.poll() is not None, timeout)
    return handle.returncode


def _text(path) -> str:
    return path.read_text() if path.exists() else ""


def _seen(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def warm():
    """One warm worker for the tests that leave it running (it imports nothing beyond vltune and torch)."""
    with WarmExecutor(preload=()) as executor:
        yield executor


def test_each_job_is_a_session_of_its_own_with_its_env_threads_logs_and_seeds(tmp_path, warm, monkeypatch):
    monkeypatch.setenv("ONLY_IN_RUNNER", "yes")  # the runner's environment, as it is when the job starts
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stdout.log").write_text("an earlier run\n")
    handles = [warm.start(_job(tmp_path, name), device, {"CUDA_VISIBLE_DEVICES": cuda, "OMP_NUM_THREADS": threads})
               for name, device, cuda, threads in (("a", 0, "0", "1"), ("b", 1, "5", "2"), ("c", "cpu", "", "3"))]
    assert all(isinstance(h, WarmHandle) for h in handles)
    assert [_wait(h) for h in handles] == [0, 0, 0]
    seen = {name: _seen(tmp_path, name) for name in "abc"}
    for (name, cuda, threads), handle in zip((("a", "0", 1), ("b", "5", 2), ("c", "", 3)), handles):
        s = seen[name]
        assert s["pid"] == handle.pid == s["sid"] == s["pgrp"]  # its own session and process group
        assert s["ppid"] == warm.worker_pid  # forked by the worker, not started cold
        assert s["env"]["CUDA_VISIBLE_DEVICES"] == cuda and s["threads"] == threads
        assert s["env"]["OMP_NUM_THREADS"] == str(threads) and s["env"]["ONLY_IN_RUNNER"] == "yes"
        assert abs(float(s["env"][LAUNCHED_AT]) - handle.started) < 1e-3
        assert s["name"] == "__main__" and s["cwd"] == os.getcwd() and s["stdin"] == ""
        assert s["cuda"] is False
        assert (tmp_path / name / "stderr.log").read_text() == "to stderr\n"
    assert (tmp_path / "a" / "stdout.log").read_text() == "an earlier run\nto stdout\n"  # appended
    assert len({s["random"] for s in seen.values()}) == len({s["torch_random"] for s in seen.values()}) == 3


def test_a_crashing_job_ends_alone_and_the_worker_goes_on(tmp_path, warm):
    long = warm.start(_job(tmp_path, "long", "sleep2"), 0, {})
    crashes = {name: warm.start(_job(tmp_path, name, name), 0, {})
               for name in ("raise", "message", "exit7", "killed")}
    codes = {name: _wait(h) for name, h in crashes.items()}
    assert codes == {"raise": 1, "message": 1, "exit7": 7, "killed": -signal.SIGKILL}  # as Popen reports them
    assert "ValueError: a job that crashes" in (tmp_path / "raise" / "stderr.log").read_text()
    assert "a job that exits with a message" in (tmp_path / "message" / "stderr.log").read_text()
    assert _wait(long) == 0  # the job running beside them went on
    after = warm.start(_job(tmp_path, "after"), 0, {})
    assert _wait(after) == 0 and _seen(tmp_path, "after")["ppid"] == _seen(tmp_path, "long")["ppid"]


def test_terminate_then_kill_a_job_that_ignores_sigterm(tmp_path, warm):
    handle = warm.start(_job(tmp_path, "stubborn", "stubborn"), 0, {})
    _wait_for(lambda: (tmp_path / "stubborn.json").exists())
    time.sleep(0.3)  # past signal(SIGTERM, SIG_IGN)
    handle.terminate()
    time.sleep(0.3)
    assert handle.poll() is None
    handle.kill()
    assert handle.returncode == -signal.SIGKILL and not alive(handle.pid)


def test_jobs_that_are_not_python_scripts_of_this_interpreter_start_cold_and_say_so(tmp_path, warm, caplog):
    caplog.set_level(logging.INFO, "vltune.runner.warm")
    other_python = os.path.realpath(sys.executable)  # the same binary under another name: another interpreter
    assert other_python != sys.executable
    parent = "import os; print(os.getppid())"
    inline = Job(task="t", out=str(tmp_path / "c"), argv=[sys.executable, "-c", parent])
    other = Job(task="t", out=str(tmp_path / "o"), argv=[other_python, _script(tmp_path, "parent", parent)])
    handles = [warm.start(inline, 0, {}), warm.start(other, 0, {})]
    assert [type(h) for h in handles] == [Handle, Handle] and all(h.process is not None for h in handles)
    assert [_wait(h) for h in handles] == [0, 0]
    for name in "co":  # children of the runner
        assert (tmp_path / name / "stdout.log").read_text().strip() == str(os.getpid())
    assert "is not 'python script.py args…'" in caplog.text and "is not this runner's interpreter" in caplog.text


@pytest.mark.slow  # starts warm workers that refuse
@pytest.mark.parametrize("hazard, why", [
    ("import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n",
     "an import started threads"),
    ("import torch\ntorch.cuda.is_initialized = lambda: True\n", "an import initialised CUDA")])
def test_a_worker_that_could_not_fork_safely_refuses_and_jobs_start_cold(tmp_path, caplog, monkeypatch, hazard,
                                                                          why):
    caplog.set_level(logging.INFO, "vltune.runner.warm")
    _script(tmp_path, "hazard_module", hazard)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with WarmExecutor(preload=("hazard_module",)) as executor:
        handle = executor.start(_job(tmp_path, "job"), 0, {})
        assert type(handle) is Handle and _wait(handle) == 0 and why in executor.off
        assert type(executor.start(_job(tmp_path, "next"), 0, {})) is Handle  # no second try
    assert f"warm worker: could not start ({why}" in caplog.text and "start as new processes" in caplog.text


@pytest.mark.slow  # kills a warm worker mid-job
def test_a_dead_worker_takes_its_jobs_along_and_the_rest_start_cold(tmp_path, caplog):
    caplog.set_level(logging.INFO, "vltune.runner.warm")
    with WarmExecutor(preload=()) as executor:
        running = executor.start(_job(tmp_path, "running", "sleep60"), 0, {})
        _wait_for(lambda: (tmp_path / "running.json").exists())
        os.kill(executor.worker_pid, signal.SIGKILL)
        assert _wait(running, timeout=10) == -signal.SIGTERM and not alive(running.pid)  # parent-death signal
        later = executor.start(_job(tmp_path, "later"), 0, {})
        assert type(later) is Handle and _wait(later) == 0
    assert "warm worker: it is gone" in caplog.text


def test_close_ends_the_jobs_left_and_reaps_the_worker(tmp_path):
    executor = WarmExecutor(preload=())
    handle = executor.start(_job(tmp_path, "left", "sleep60"), 0, {})
    worker = executor.worker.proc
    _wait_for(lambda: (tmp_path / "left.json").exists())
    executor.close()
    assert worker.returncode is not None and not alive(worker.pid)  # reaped: no zombie
    _wait_for(lambda: not alive(handle.pid), timeout=5)
    assert executor.worker is None and executor.worker_pid is None


# ---- a real job -----------------------------------------------------------------------------------------------
def _train_job(out: str, root: str, weights: str, trainer: str = "ZeroshotCLIP") -> Job:
    """A tiny ``train.py`` job: ZeroshotCLIP evaluation only, or a CoOp training long enough to be stopped."""
    config, flags, opts = {
        "ZeroshotCLIP": ("ZeroshotCLIP/tiny", ["--eval-only"], []),
        "CoOp": ("CoOp/tiny_ep10", [], ["DATASET.NUM_SHOTS", "4", "OPTIM.MAX_EPOCH", "200"])}[trainer]
    argv = [sys.executable, str(REPO / "train.py"), "--root", root, "--seed", "1", "--trainer", trainer,
            "--dataset-config-file", str(REPO / "configs/datasets/digits.yaml"), "--config-file",
            str(REPO / f"configs/trainers/{config}.yaml"), "--output-dir", out, *flags, "MODEL.BACKBONE.WEIGHTS",
            weights, "USE_CUDA", "False", *opts]
    return Job(task="t", out=out, argv=argv)


@pytest.mark.slow  # real train.py, cold and warm
def test_a_train_py_job_gives_the_cold_result_sooner_from_a_worker_that_never_touched_cuda(tmp_path, digits_root,
                                                                                           random_clip_weights):
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    records = {}
    with WarmExecutor(preload=parallel_runner.PRELOAD) as warm_executor:  # the runner's preload
        assert warm_executor.warm_up(str(REPO / "train.py"), env)  # not on the clock of the first warm job
        probe = warm_executor.start(_job(tmp_path, "probe"), 0, env)
        assert isinstance(probe, WarmHandle) and _wait(probe, timeout=120) == 0
        for kind, executor in (("cold", LocalExecutor()), ("warm", warm_executor)):
            out = str(tmp_path / kind)
            handle = executor.start(_train_job(out, digits_root, random_clip_weights), 0, env)
            assert isinstance(handle, WarmHandle) == (kind == "warm")
            assert _wait(handle, timeout=120) == 0, (tmp_path / kind / "stderr.log").read_text()
            records[kind] = json.loads((tmp_path / kind / "result.json").read_text())
        # a training job stopped the way the runner stops it records itself cancelled, as a cold one does
        coop = warm_executor.start(_train_job(str(tmp_path / "coop"), digits_root, random_clip_weights, "CoOp"), 0,
                                   env)
        _wait_for(lambda: "epoch [2/200]" in _text(tmp_path / "coop" / "log.txt"), timeout=60)
        coop.terminate()
        assert _wait(coop) == 130
    cancelled = json.loads((tmp_path / "coop" / "result.json").read_text())
    assert cancelled["status"] == "cancelled" and cancelled["cost"]["startup_s"] > 0
    seen = _seen(tmp_path, "probe")
    assert seen["modules"] == ["datasets", "open_clip", "trainers", "vltune"] and seen["cuda"] is False
    assert seen["frozen"] > 100_000  # the preloaded heap sits out of the collector's (and the memory meter's) walks
    cold, warm = records["cold"], records["warm"]
    assert cold["status"] == warm["status"] == "success"
    assert cold["metrics"] == warm["metrics"] and cold["identity"] == warm["identity"]
    assert cold["cost"]["eval_peak_mb"] == warm["cost"]["eval_peak_mb"] > 0  # the frozen heap holds no tensor
    assert "startup" not in json.dumps(cold["identity"]) + json.dumps(cold["config"])
    assert 0 < warm["cost"]["startup_s"] < cold["cost"]["startup_s"]  # the imports were done before the launch
    assert "* accuracy:" in (tmp_path / "warm" / "stdout.log").read_text()  # the console lines, as a cold job's


def test_startup_is_none_without_a_runner_and_counts_from_the_launch(monkeypatch):
    import torch

    monkeypatch.delenv(LAUNCHED_AT, raising=False)
    meter = CostMeter(torch.device("cpu"))
    meter.first_batch()
    assert meter.startup_s() is None
    monkeypatch.setenv(LAUNCHED_AT, f"{time.time() - 2.5:.6f}")
    meter = CostMeter(torch.device("cpu"))
    assert meter.startup_s() is None  # no batch yet
    meter.first_batch()
    first = meter.first_batch_at
    meter.first_batch()
    assert meter.first_batch_at == first and 2.5 <= meter.startup_s() < 5.0


# ---- the runner's choice --------------------------------------------------------------------------------------
CONFIG = """
base = dict(data=dict(root="data"), model=dict(backbone="vltune-tiny"), output=dict(root="output"){executor})
a = dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=["digits"], eval_only=True)
pipeline = [dict(gpu_ids=[], tasks=["a"])]
"""


@pytest.mark.parametrize("executor, flags, expected", [
    ("", [], WarmExecutor), ("", ["--cold"], LocalExecutor), ("", ["--debug"], InlineExecutor),
    (", executor=dict(warm=False)", [], LocalExecutor), (", executor=dict(warm=True)", ["--cold"], LocalExecutor)])
def test_the_runner_forks_warm_jobs_unless_told_otherwise(tmp_path, executor, flags, expected):
    (tmp_path / "configs.py").write_text(CONFIG.format(executor=executor))
    experiments = load_experiments(str(tmp_path / "configs.py"), str(REPO))
    made, _ = parallel_runner.make_executor(experiments, parallel_runner.build_parser().parse_args(flags))
    assert type(made) is expected
    if expected is WarmExecutor:
        assert made.log == os.path.join(experiments.base.output_root, "warm_worker.log") and made.worker is None
        assert {"trainers", "datasets"} <= set(made.preload)  # the entry point preloads the plugin packages


def test_a_bad_warm_setting_is_named(tmp_path):
    (tmp_path / "configs.py").write_text(CONFIG.format(executor=", executor=dict(warm='no')"))
    with pytest.raises(SuiteError, match=r"base\['executor'\]: 'warm' = 'no' \(str\).*expected a bool"):
        load_experiments(str(tmp_path / "configs.py"), str(REPO))
    (tmp_path / "configs.py").write_text(CONFIG.format(executor=", executor=dict(worm=False)"))
    with pytest.raises(SuiteError, match="unknown key 'worm'.*warm"):
        load_experiments(str(tmp_path / "configs.py"), str(REPO))
