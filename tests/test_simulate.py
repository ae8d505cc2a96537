"""The scheduling simulator (vltune.runner.simulate): it agrees with a real run of the same fake jobs, it is fast,
it keeps the scheduler's rules, it fails jobs that overcommit a GPU, and the benchmark's job table is documented."""

from __future__ import annotations

import os
import statistics
import sys
import time

import pytest
from fakejobs import fake_job

from vltune.runner.executor import LocalExecutor
from vltune.runner.jobs import Job
from vltune.runner.packing import MemoryPlacement
from vltune.runner.scheduler import Lane, Scheduler, SlotPlacement
from vltune.runner.simulate import BarrierPlacement, SimJob, TablePeaks, simulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

# (name, sleep s, depends on): four train jobs and their evaluations
SUITE = [("a", 1.5, ""), ("b", 1.0, ""), ("c", 0.8, ""), ("d", 1.2, ""),
         ("a_eval", 0.5, "a"), ("b_eval", 0.7, "b"), ("c_eval", 0.6, "c"), ("d_eval", 0.5, "d")]


def _order(suite: list[tuple[str, float, str]]) -> list[tuple[str, float, str]]:
    """vltune's job order: each evaluation right after its train job."""
    out = []
    for name, sleep, dep in suite:
        if not dep:
            out.append((name, sleep, dep))
            out += [s for s in suite if s[2] == name]
    return out


@pytest.mark.parametrize("slots", [1, 2])
def test_simulation_matches_a_real_run_of_the_same_jobs(tmp_path, slots):
    suite = _order(SUITE)
    lanes = [Lane(devices=[0, 1], slots=slots, tasks=["t"])]
    events = str(tmp_path / "events.jsonl")
    jobs = [fake_job(str(tmp_path / "real"), name, events, sleep=sleep, depends_on=dep) for name, sleep, dep in suite]
    scheduler = Scheduler(jobs, lanes, LocalExecutor(), poll_s=0.02, cuda_visible=["0", "1"])
    t0 = time.time()
    result = scheduler.run()
    real = time.time() - t0
    assert result.counts["success"] == len(suite)
    overhead = statistics.mean(s.wall_s - sleep for s, (_, sleep, _) in zip(result.states, suite))
    sim = [SimJob(Job(task="t", out=j.out, argv=j.argv, depends_on=j.depends_on, role=j.role, dataset=j.dataset,
                      identity=dict(j.identity)), duration_s=sleep, startup_s=overhead)
           for j, (_, sleep, _) in zip(jobs, suite)]
    report = simulate(sim, lanes, memory_mb=1000.0)
    print(f"slots {slots}: real makespan {real:.2f} s, simulated {report.makespan_s:.2f} s "
          f"(mean start-up {overhead:.3f} s)")
    assert report.counts["success"] == len(suite)
    assert abs(report.makespan_s - real) <= 0.10 * real


def _suite(n_tasks: int, per_task: int, *, train_mb: float = 1000.0) -> list[SimJob]:
    jobs = []
    for t in range(n_tasks):
        for i in range(per_task):
            train = Job(task=f"t{t}", out=f"/t{t}/train{i}", argv=["python", "train.py"], role="base",
                        trainer=f"M{t}", dataset=f"d{i}", seed=1, identity={"k": i})
            ev = Job(task=f"t{t}", out=f"/t{t}/eval{i}", argv=["python", "train.py", "--eval-only"], role="new",
                     trainer=f"M{t}", dataset=f"d{i}", seed=1, depends_on=train.out, identity={"k": i})
            jobs += [SimJob(train, 60.0 + 7 * (i % 13), train_mb * (1 + i % 3), 5.0),
                     SimJob(ev, 10.0 + i % 5, 500.0, 5.0)]
    return jobs


def test_a_thousand_job_suite_simulates_in_seconds():
    jobs = _suite(10, 50)
    t0 = time.perf_counter()
    report = simulate(jobs, [Lane(devices=list(range(8)), slots=2, tasks=[f"t{t}" for t in range(10)])],
                      memory_mb=80000.0)
    wall = time.perf_counter() - t0
    print(f"1,000 simulated jobs in {wall:.1f} s (simulated makespan {report.makespan_s / 3600:.2f} h)")
    assert report.counts["success"] == 1000
    assert wall < 60


def _spans(report):
    return {a.out: a for a in report.jobs if not a.oom}


def test_dependencies_lane_order_and_slots_are_kept():
    jobs = _suite(2, 12)
    lanes = [Lane(devices=[0, 1], slots=2, tasks=["t0", "t1"])]
    report = simulate(jobs, lanes, memory_mb=1e6)
    spans = _spans(report)
    for sj in jobs:
        if sj.job.depends_on:
            assert spans[sj.job.out].start >= spans[sj.job.depends_on].end
    first = [spans[sj.job.out].start for sj in jobs if sj.job.task == "t0" and not sj.job.depends_on]
    second = [spans[sj.job.out].start for sj in jobs if sj.job.task == "t1" and not sj.job.depends_on]
    assert max(first) <= min(second)  # lane order: no t1 train job before every t0 train job has started
    for d in (0, 1):
        for a in (x for x in report.jobs if x.device == d):
            assert sum(1 for b in report.jobs if b.device == d and b.start <= a.start < b.end) <= 2
    assert report.idle_s >= 0 and 0 < report.utilisation <= 1


def test_barrier_policy_runs_one_job_per_gpu_task_after_task():
    jobs = _suite(2, 6)
    report = simulate(jobs, [Lane(devices=[0, 1, 2], slots=4, tasks=["t0", "t1"])], BarrierPlacement, memory_mb=1e6)
    spans = _spans(report)
    by = {(sj.job.task, bool(sj.job.depends_on)): [] for sj in jobs}
    for sj in jobs:
        by[(sj.job.task, bool(sj.job.depends_on))].append(spans[sj.job.out])
    assert min(a.start for a in by[("t0", True)]) >= max(a.end for a in by[("t0", False)])  # the `wait` barrier
    assert min(a.start for a in by[("t1", False)]) >= max(a.end for a in by[("t0", True)])  # task after task
    for a in report.jobs:
        assert not any(b is not a and b.device == a.device and b.start < a.end and a.start < b.end
                       for b in report.jobs)


def _peak_in_use(report) -> float:
    worst = 0.0
    for a in report.jobs:
        live = [b for b in report.jobs if not b.oom and b.device == a.device and b.start <= a.start < b.end]
        worst = max(worst, sum(b.peak_mb for b in live))
    return worst


def test_memory_packing_never_overcommits_with_right_estimates():
    jobs = _suite(2, 20, train_mb=9000.0)
    lanes = [Lane(devices=[0, 1], slots=1, tasks=["t0", "t1"])]
    report = simulate(jobs, lanes, lambda ln: MemoryPlacement(ln, 30000.0, TablePeaks(jobs), default_mb=4096),
                      memory_mb=32000.0)
    assert report.counts["success"] == len(jobs) and report.oom_attempts == 0
    assert _peak_in_use(report) <= 32000.0
    assert max(sum(1 for b in report.jobs if b.device == a.device and b.start <= a.start < b.end)
               for a in report.jobs) > 1  # it did pack


def test_overcommitted_slots_fail_with_oom_and_packing_retries_low_estimates():
    jobs = _suite(1, 20, train_mb=9000.0)
    lanes = [Lane(devices=[0, 1], slots=4, tasks=["t0"])]
    slots = simulate(jobs, lanes, SlotPlacement, memory_mb=32000.0)
    assert slots.oom_attempts > 0 and slots.counts["failed"] == slots.oom_attempts
    assert slots.counts["skipped"] > 0  # their evaluations
    low = simulate(jobs, lanes, lambda ln: MemoryPlacement(ln, 30000.0, TablePeaks(jobs, scale=0.6),
                                                          default_mb=4096), memory_mb=32000.0)
    assert low.oom_attempts > 0 and low.counts["success"] == len(jobs)  # each retried alone, once


def test_job_table_documents_every_number():
    import scheduling

    table = scheduling.load_table()
    assert table["assumptions"] and table["datasets"]
    fresh = scheduling.build_table()
    assert fresh["rows"] == table["rows"], "benchmarks/scheduling_jobs.json is stale: run --write-table"
    from vltune.runner import presets

    methods = [m for m, e in presets.methods().items() if e.get("b2n")]
    assert {r["method"] for r in table["rows"]} == set(methods)
    assert len(table["rows"]) == len(methods) * len(presets.BENCHMARK_DATASETS) * 2
    for row in table["rows"]:
        for key in ("duration_s", "peak_mb", "startup_s"):
            assert isinstance(row[key], (int, float)) and row[key] >= 0, (row["method"], row["dataset"], key)
            assert row["source"][key], (row["method"], row["dataset"], key)
        assert row["seeds"] == [1, 2, 3] and row["dataset"] in presets.BENCHMARK_DATASETS
    jobs = scheduling.sim_jobs(table)
    assert len(jobs) == 3 * len(table["rows"])
    outs = {sj.job.out for sj in jobs}
    assert all(sj.job.depends_on in outs for sj in jobs if sj.job.depends_on)


def test_jobs_sharing_a_gpu_share_its_compute():
    """Two jobs that each saturate a GPU (compute 1) run at half speed while together; two that each use half of it
    do not slow each other; start-up is never slowed."""
    def run(compute: float, second_at: float) -> dict[str, tuple[float, float]]:
        first = SimJob(Job(task="t", out="/a", argv=["x"], role="a", dataset="a"), 100.0, compute=compute)
        # the second job's start-up delays its GPU work by second_at seconds
        second = SimJob(Job(task="t", out="/b", argv=["x"], role="b", dataset="b"), 100.0, compute=compute,
                        startup_s=second_at)
        report = simulate([first, second], [Lane(devices=[0], slots=2, tasks=["t"])], memory_mb=1e6)
        return {a.out: (a.start, a.end) for a in report.jobs}

    assert run(0.5, 0.0) == {"/a": (0.0, 100.0), "/b": (0.0, 100.0)}
    assert run(1.0, 0.0) == {"/a": (0.0, 200.0), "/b": (0.0, 200.0)}
    # a alone for 50 s, then both at half speed: a's last 50 s of work take 100 s; b finishes its last 50 s alone
    ends = run(1.0, 50.0)
    assert ends["/a"][1] == pytest.approx(150.0) and ends["/b"][1] == pytest.approx(200.0)


def test_the_readme_quotes_the_committed_benchmark_results():
    """The README's scheduling block is generated (benchmarks/scheduling.py --readme) from the committed results."""
    import json

    import scheduling

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "benchmarks", "results", "scheduling.json")) as f:
        runs = json.load(f)["runs"]
    with open(os.path.join(repo, "README.md")) as f:
        readme = f.read()
    begin, end = scheduling.README_MARKERS
    assert readme.split(begin, 1)[1].split(end, 1)[0].strip() == scheduling.readme_block(runs)
    assert [r["compute"] for r in runs] == [0.0, 0.25, 0.5, 1.0]
