"""The runner's scheduler on fake jobs (processes that sleep, print and fail): slots, devices, dependencies without a
barrier, failure isolation, resume after a killed runner, Ctrl-C, and the output-folder lock.

Where the behaviour must not depend on how a job is started, a test runs with both local executors (the ``executor``
fixture): ``LocalExecutor`` (a fresh interpreter per job) and ``WarmExecutor`` (a child forked from the warm worker;
``WarmScripts`` runs each fake ``python -c CODE`` job as ``python job.py`` and fails a job that did not go warm)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from fakejobs import IDENTITY, fake_job, read_events, run_spec
from procs import alive, default_sigint

from vltune.results.record import read_record
from vltune.runner.executor import LocalExecutor
from vltune.runner.lock import LockedError, RunnerLock
from vltune.runner.scheduler import Lane, Scheduler
from vltune.runner.warm import WarmExecutor, WarmHandle


class WarmScripts(WarmExecutor):
    """``WarmExecutor`` on the fake jobs: a ``python -c CODE`` job runs as ``python <scripts>/<job>.py`` (the same
    code), forked by the warm worker, which here imports nothing beyond vltune; such a job that would start cold
    fails to start instead (so a silent fallback cannot pass a test meant for warm jobs)."""

    def __init__(self, scripts: str, **kw) -> None:
        super().__init__(preload=kw.pop("preload", ()), **kw)
        self.scripts = scripts

    def start(self, job, device, env):
        if job.argv[1:2] != ["-c"] or not os.path.isfile(job.argv[0]):
            return super().start(job, device, env)
        os.makedirs(self.scripts, exist_ok=True)
        path = os.path.join(self.scripts, f"{job.task}-{os.path.basename(job.out)}.py")
        with open(path, "w") as f:
            f.write(job.argv[2])
        handle = super().start(dataclasses.replace(job, argv=[job.argv[0], path, *job.argv[3:]]), device, env)
        assert isinstance(handle, WarmHandle), f"{job.out} started cold: {self.off or 'see the log'}"
        return handle


# The warm runs are slow: each starts a warm worker (torch imported) for one scenario; test_runner_warm.py covers
# the warm executor itself in the fast loop.
@pytest.fixture(params=["local", pytest.param("warm", marks=pytest.mark.slow)])
def executor(request, tmp_path):
    """Each local executor in turn (the warm one is closed, its worker reaped, at the end of the test)."""
    if request.param == "local":
        yield LocalExecutor()
        return
    with WarmScripts(str(tmp_path / "scripts")) as warm:
        yield warm
    assert warm.worker is None


def _intervals(events: list[dict]) -> dict[str, tuple[float, float, dict]]:
    start = {e["name"]: e for e in events if e["event"] == "start"}
    end = {e["name"]: e["t"] for e in events if e["event"] == "end"}
    return {n: (e["t"], end.get(n, float("inf")), e) for n, e in start.items()}


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.slow  # timed fake jobs, overlap measured
def test_concurrency_never_exceeds_gpus_times_slots_and_each_job_sees_its_gpu(tmp_path, executor):
    events = str(tmp_path / "events.jsonl")
    spec = dict(root=str(tmp_path), events=events, lanes=[dict(devices=[0, 1], slots=2, tasks=["t"])],
                jobs=[dict(name=f"j{i}", sleep=0.4) for i in range(10)])
    result = run_spec(spec, executor=executor)
    assert result.counts["success"] == 10
    spans = _intervals(read_events(events))
    assert len(spans) == 10
    assert 2 < _max_overlap([(s, e) for s, e, _ in spans.values()]) <= 4  # parallel, never beyond 2 GPUs × 2 slots
    for gpu in ("0", "1"):
        on_gpu = [(s, e) for s, e, ev in spans.values() if ev["cuda"] == gpu]
        assert on_gpu and _max_overlap(on_gpu) <= 2
    assert {ev["cuda"] for _, _, ev in spans.values()} == {"0", "1"}
    for j in range(10):  # the runner's device matches what the job saw
        record = read_record(str(tmp_path / f"j{j}" / "result.json"))
        assert record["runner"]["device"] == spans[f"j{j}"][2]["cuda"]


@pytest.mark.slow  # timed fake jobs on two lanes
def test_jobs_stay_on_their_lane_and_cpu_jobs_see_no_gpu(tmp_path, executor):
    events = str(tmp_path / "events.jsonl")
    spec = dict(root=str(tmp_path), events=events,
                lanes=[dict(devices=[3], slots=1, tasks=["a"]), dict(devices=[5, 6], slots=1, tasks=["b"]),
                       dict(devices=["cpu"], slots=1, tasks=["c"])],
                # 1 s per job: lanes must overlap even when process start-up is slowed by a loaded machine
                jobs=[dict(name=f"{t}{i}", task=t, sleep=1.0) for t in "abc" for i in range(3)])
    assert run_spec(spec, executor=executor).counts["success"] == 9
    seen = {ev["name"]: ev["cuda"] for ev in read_events(events) if ev["event"] == "start"}
    assert {seen[f"a{i}"] for i in range(3)} == {"3"}
    assert {seen[f"b{i}"] for i in range(3)} <= {"5", "6"}
    assert {seen[f"c{i}"] for i in range(3)} == {""}  # CUDA_VISIBLE_DEVICES="" hides every GPU
    spans = _intervals(read_events(events))
    assert _max_overlap([spans[f"a{i}"][:2] for i in range(3)]) == 1  # one slot on GPU 3
    # the three lanes ran side by side
    assert _max_overlap([(s, e) for s, e, _ in spans.values()]) >= 3


@pytest.mark.slow  # timed fake jobs
def test_evaluation_starts_when_its_own_train_job_ends_while_other_trains_run(tmp_path, executor):
    events = str(tmp_path / "events.jsonl")
    jobs = [dict(name="train_fast", sleep=0.2), dict(name="train_slow", sleep=2.5),
            dict(name="eval_fast", depends_on="train_fast", sleep=0.1),
            dict(name="eval_slow", depends_on="train_slow", sleep=0.1)]
    spec = dict(root=str(tmp_path), events=events, lanes=[dict(devices=[0], slots=3, tasks=["t"])], jobs=jobs)
    assert run_spec(spec, executor=executor).counts["success"] == 4
    spans = _intervals(read_events(events))
    assert spans["eval_fast"][0] >= spans["train_fast"][1]  # after its own train job
    assert spans["eval_fast"][0] < spans["train_slow"][1]  # not after the slow one: no barrier
    assert spans["eval_fast"][0] - spans["train_fast"][1] < 1.0
    assert spans["eval_slow"][0] >= spans["train_slow"][1]


def test_a_failing_job_skips_its_dependents_and_the_others_go_on(tmp_path, executor):
    events = str(tmp_path / "events.jsonl")
    jobs = [dict(name="bad", fail=3), dict(name="bad_eval", depends_on="bad"),
            dict(name="bad_eval2", depends_on="bad_eval"), dict(name="good", sleep=0.2),
            dict(name="good_eval", depends_on="good")]
    spec = dict(root=str(tmp_path), events=events, lanes=[dict(devices=[0], slots=2, tasks=["t"])], jobs=jobs)
    result = run_spec(spec, executor=executor)
    assert dict(result.counts) == {"failed": 1, "skipped": 2, "success": 2}
    bad = read_record(str(tmp_path / "bad" / "result.json"))
    assert bad["status"] == "failed" and bad["runner"]["exit_code"] == 3
    assert "boom: job bad failed on purpose" in bad["runner"]["log_tail"]
    for name in ("bad_eval", "bad_eval2"):
        record = read_record(str(tmp_path / name / "result.json"))
        assert record["status"] == "skipped" and "not run" in record["error"]
        assert os.path.exists(tmp_path / name / "job.json")
    assert "bad_eval" not in {e["name"] for e in read_events(events)}
    failures = result.failures()
    assert [f["job"] for f in failures] == ["t bad bad seed0"] and failures[0]["exit_code"] == 3
    assert "working on bad" in (tmp_path / "bad" / "stdout.log").read_text()


def test_resume_skips_finished_jobs_and_reruns_failed_ones_only_when_asked(tmp_path, executor):
    events = str(tmp_path / "events.jsonl")
    spec = dict(root=str(tmp_path), events=events, lanes=[dict(devices=[0], slots=2, tasks=["t"])],
                jobs=[dict(name="a"), dict(name="b", fail=2), dict(name="c", depends_on="a")])
    assert dict(run_spec(spec, executor=executor).counts) == {"success": 2, "failed": 1}
    assert len(read_events(events)) == 2 * 2 + 1  # a, c: start+end; b: start
    again = run_spec(spec, executor=executor)
    assert dict(again.counts) == {"success": 2, "failed": 1} and all(s.previous for s in again.states)
    assert len(read_events(events)) == 5  # nothing ran
    spec["jobs"][1]["fail"] = 0
    assert dict(run_spec(spec, executor=executor, rerun_failed=True).counts) == {"success": 3}
    assert [e["name"] for e in read_events(events)[5:]] == ["b", "b"]  # only the failed job ran again
    run_spec(spec, executor=executor, force=True)
    assert sorted(e["name"] for e in read_events(events)[7:] if e["event"] == "start") == ["a", "b", "c"]


def test_a_rerun_train_job_makes_its_evaluations_rerun(tmp_path):
    events = str(tmp_path / "events.jsonl")
    spec = dict(root=str(tmp_path), events=events, lanes=[dict(devices=[0], slots=1, tasks=["t"])],
                jobs=[dict(name="train"), dict(name="eval", depends_on="train")])
    run_spec(spec)
    os.remove(tmp_path / "train" / "result.json")  # e.g. the train job was cancelled and is resumed
    run_spec(spec)
    assert [e["name"] for e in read_events(events) if e["event"] == "start"] == ["train", "eval", "train", "eval"]


def test_a_finished_folder_of_another_config_is_stale_kept_and_named_and_the_rest_runs(tmp_path):
    events = str(tmp_path / "events.jsonl")
    jobs = [fake_job(str(tmp_path), "a", events), fake_job(str(tmp_path), "b", events, depends_on="a"),
            fake_job(str(tmp_path), "c", events, task="u")]
    os.makedirs(jobs[0].out)
    stale = {"status": "success", "identity": {"fake.key": "old value"}, "metrics": {"accuracy": 1.0}}
    with open(os.path.join(jobs[0].out, "result.json"), "w") as f:
        json.dump(stale, f)
    scheduler = Scheduler(jobs, [Lane([0], 1, ["t", "u"])], LocalExecutor(), poll_s=0.02)
    report = scheduler.stale_report()
    assert ("task 't': 1 job folders hold a finished run of a different config: fake.key old value → fake value"
            in report)
    assert "--rerun-stale" in report and "'u'" not in report
    result = scheduler.run()
    assert dict(result.counts) == {"stale": 1, "skipped": 1, "success": 1}  # b needs a's model; c runs
    assert [e["name"] for e in read_events(events) if e["event"] == "start"] == ["c"]
    assert read_record(os.path.join(jobs[0].out, "result.json"))["identity"] == stale["identity"]  # kept
    again = Scheduler(jobs, [Lane([0], 1, ["t", "u"])], LocalExecutor(), poll_s=0.02, rerun_stale=True).run()
    assert dict(again.counts) == {"success": 3}
    assert [e["name"] for e in read_events(events) if e["event"] == "start"] == ["c", "a", "b"]  # c stays done


# tests/fakejobs.py's runner with the warm executor instead of the local one
WARM_DRIVER = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from fakejobs import run_spec
from test_runner import WarmScripts
with open(sys.argv[1]) as f:
    spec = json.load(f)
with WarmScripts({scripts!r}) as executor:
    result = run_spec(spec, executor=executor, grace_s=5.0)
print(json.dumps(dict(result.counts), sort_keys=True), flush=True)
sys.exit(130 if result.interrupted else 0)
"""


def _kind(executor) -> str:
    return "warm" if isinstance(executor, WarmExecutor) else "local"


def _driver(tmp_path, jobs: list[dict], slots: int = 1, kind: str = "local") -> tuple[subprocess.Popen, str]:
    """A runner in its own process on ``jobs`` with the ``kind`` executor; (process, events file)."""
    events = str(tmp_path / "events.jsonl")
    spec = dict(root=str(tmp_path / "jobs"), events=events, lanes=[dict(devices=[0], slots=slots, tasks=["t"])],
                jobs=jobs)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = REPO / "tests" / "fakejobs.py"
    if kind == "warm":
        script = tmp_path / "warm_driver.py"
        script.write_text(WARM_DRIVER.format(repo=str(REPO), tests=str(REPO / "tests"),
                                             scripts=str(tmp_path / "scripts")))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "spec.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    return proc, events


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _successes(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if (read_record(os.path.join(root, n, "result.json")) or {}).get(
        "status") == "success")


@pytest.mark.slow  # a runner subprocess killed, then rerun
def test_kill_9_of_the_runner_then_rerun_completes_only_the_missing_jobs(tmp_path, executor):
    kind = _kind(executor)
    jobs = [dict(name=f"j{i}", sleep=1.0) for i in range(6)]
    proc, events = _driver(tmp_path, jobs, kind=kind)
    root = tmp_path / "jobs"
    _wait_for(lambda: len([e for e in read_events(events) if e["event"] == "start"]) == 3)
    proc.kill()
    proc.wait()
    # its running job dies with it (parent-death signal): no orphan keeps writing results; nor does the job's
    # parent stay (the warm worker; for a local job, the runner itself)
    starts = [e for e in read_events(events) if e["event"] == "start"]
    started = [e["pid"] for e in starts] + [e["ppid"] for e in starts]
    if kind == "warm":
        assert len({e["ppid"] for e in starts}) == 1 and starts[0]["ppid"] != proc.pid  # one worker forked all
    _wait_for(lambda: not any(alive(p) for p in started), timeout=10)
    time.sleep(1.2)
    ended = {e["name"] for e in read_events(events) if e["event"] == "end"}
    killed = {e["name"] for e in read_events(events) if e["event"] == "start"} - ended
    assert len(killed) == 1  # the job running at the kill died instead of finishing as an orphan
    done = _successes(root)
    assert 2 <= len(done) < 6
    before = len(read_events(events))
    from fakejobs import run_spec as rerun

    result = rerun(json.loads((tmp_path / "spec.json").read_text()), executor=executor)
    assert result.counts["success"] == 6
    reran = [e["name"] for e in read_events(events)[before:] if e["event"] == "start"]
    assert sorted(reran) == sorted(set(f"j{i}" for i in range(6)) - set(done))  # exactly the missing ones
    assert sum(s.previous for s in result.states) == len(done)


@pytest.mark.slow  # signals a runner subprocess
def test_ctrl_c_ends_every_process_group_it_started_and_records_them_cancelled(tmp_path, executor):
    jobs = [dict(name=f"j{i}", sleep=60, grandchild=True) for i in range(3)] + [dict(name="later", sleep=0)]
    proc, events = _driver(tmp_path, jobs, slots=3, kind=_kind(executor))
    _wait_for(lambda: len([e for e in read_events(events) if e["event"] == "start"]) == 3)
    starts = [e for e in read_events(events) if e["event"] == "start"]
    pids = [e["pid"] for e in starts] + [e["grandchild"] for e in starts]
    assert all(alive(p) for p in pids)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert json.loads(out.strip().splitlines()[-1]) == {"cancelled": 3, "pending": 1}
    _wait_for(lambda: not any(alive(p) for p in pids), timeout=5)  # jobs and their grandchildren
    assert not alive(starts[0]["ppid"])  # the warm worker was stopped too
    for i in range(3):
        record = read_record(str(tmp_path / "jobs" / f"j{i}" / "result.json"))
        assert record["status"] == "cancelled" and record["runner"]["exit_code"] == -signal.SIGTERM
    assert not os.path.exists(tmp_path / "jobs" / "later" / "result.json")


@pytest.mark.slow  # signals a runner subprocess
def test_sigterm_to_the_runner_cancels_like_ctrl_c(tmp_path, executor):
    proc, events = _driver(tmp_path, [dict(name="long", sleep=60)], kind=_kind(executor))
    _wait_for(lambda: any(e["event"] == "start" for e in read_events(events)))
    pid, parent = read_events(events)[0]["pid"], read_events(events)[0]["ppid"]
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    _wait_for(lambda: not alive(pid) and not alive(parent), timeout=5)  # the job, and the warm worker
    assert read_record(str(tmp_path / "jobs" / "long" / "result.json"))["status"] == "cancelled"


def test_a_second_runner_on_the_same_output_folder_refuses(tmp_path):
    with RunnerLock(str(tmp_path)):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}.*another folder"):
            RunnerLock(str(tmp_path)).__enter__()
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
                "from vltune.runner.lock import RunnerLock, LockedError\n"
                f"try:\n    RunnerLock({str(tmp_path)!r}).__enter__()\n"
                "except LockedError as e:\n    print(e); sys.exit(3)")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode == 3 and "another vltune runner" in other.stdout
    with RunnerLock(str(tmp_path)):  # released on exit
        pass


def test_fake_jobs_write_what_train_py_writes(tmp_path):
    events = str(tmp_path / "events.jsonl")
    spec = dict(root=str(tmp_path), events=events, lanes=[dict(devices=[0], slots=1, tasks=["t"])],
                jobs=[dict(name="a")])
    run_spec(spec)
    record = read_record(str(tmp_path / "a" / "result.json"))
    assert record["identity"] == IDENTITY and record["status"] == "success" and "runner" in record
    assert json.loads((tmp_path / "a" / "job.json").read_text())["identity"] == IDENTITY


def test_a_job_that_cannot_start_is_recorded_failed_and_the_rest_run(tmp_path, executor):
    events = str(tmp_path / "events.jsonl")
    broken = fake_job(str(tmp_path), "broken", events)
    broken.argv = [str(tmp_path / "no-such-interpreter"), "-c", "pass"]
    jobs = [broken, fake_job(str(tmp_path), "fine", events)]
    result = Scheduler(jobs, [Lane([0], 1, ["t"])], executor, poll_s=0.02).run()
    assert dict(result.counts) == {"failed": 1, "success": 1}
    record = read_record(str(tmp_path / "broken" / "result.json"))
    assert record["status"] == "failed" and "no-such-interpreter" in record["runner"]["log_tail"]


def test_gpu_ids_index_the_runners_own_visible_devices(tmp_path, executor):
    events = str(tmp_path / "events.jsonl")
    jobs = [fake_job(str(tmp_path), "a", events)]
    Scheduler(jobs, [Lane([1], 1, ["t"])], executor, cuda_visible=["4", "7"], poll_s=0.02).run()
    assert [e["cuda"] for e in read_events(events) if e["event"] == "start"] == ["7"]


def test_inline_jobs_detach_their_log_file_when_they_end(tmp_path):
    import logging

    from vltune.runner.executor import InlineExecutor
    from vltune.runner.jobs import Job

    script = tmp_path / "job.py"
    script.write_text("import logging\nfrom vltune.logs import setup_logging\n"
                      "def main(argv, console=True):\n    setup_logging(argv[0], console=console)\n"
                      "    logging.getLogger('vltune.job').info('inside the job')\n    return 0\n")
    out = tmp_path / "out"
    handle = InlineExecutor().start(Job(task="t", out=str(out), argv=[sys.executable, str(script), str(out)]), 0, {})
    logging.getLogger("vltune.after").warning("after the job")
    text = (out / "log.txt").read_text()
    assert handle.poll() == 0 and "inside the job" in text and "after the job" not in text


def test_a_malformed_finished_record_is_kept_and_named_not_a_crash(tmp_path):
    events = str(tmp_path / "events.jsonl")
    job = fake_job(str(tmp_path), "a", events)
    os.makedirs(job.out)
    damaged = json.dumps({"status": "success", "job": ["not", "a", "mapping"]})
    with open(os.path.join(job.out, "result.json"), "w") as f:
        f.write(damaged)
    scheduler = Scheduler([job], [Lane([0], 1, ["t"])], LocalExecutor(), poll_s=0.02)
    assert "result.json malformed" in scheduler.stale_report()
    assert dict(scheduler.run().counts) == {"stale": 1} and not read_events(events)
    assert open(os.path.join(job.out, "result.json")).read() == damaged
