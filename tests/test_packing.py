"""Memory-aware packing (``vltune.runner.packing``) with fake jobs on the real ``LocalExecutor``.

Devices 0 and 1 are simulated: a job is a CPU process, its "GPU" only ``CUDA_VISIBLE_DEVICES``, and the memory
budget a number. From the jobs' start/end events: the expected memory on a device never exceeds its budget, jobs that
fit run together, an unknown job is probed once per key (or defaulted, said in a log line), an out-of-memory
failure is retried once alone and recorded, and lanes and dependencies hold as with fixed slots. Also: the probe
mode of ``train.py``, the ``schedule`` settings and ``--dry-run``'s estimates.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap

import pytest
from conftest import REPO
from fakejobs import IDENTITY, fake_job, read_events

import parallel_runner
import train
from vltune.runner.executor import LocalExecutor
from vltune.runner.packing import ExecutorProber, MemoryPlacement, PeakEstimator
from vltune.runner.scheduler import Lane, Scheduler, SlotPlacement
from vltune.runner.schema import ScheduleSettings, SuiteError, load_experiments

BUDGET = 2000.0


def _history(root: str, dataset: str, peak_mb: float, meter: str = "cuda_max_allocated") -> None:
    """A finished run of the fake key ``dataset`` with training peak ``peak_mb`` (what a previous suite left)."""
    folder = os.path.join(root, "history", dataset)
    os.makedirs(folder)
    record = dict(status="success", identity=IDENTITY, metrics=dict(accuracy=50.0),
                  job=dict(trainer="Fake", config="fake_config", dataset=dataset, shots=0, phase="train",
                           protocol="fewshot", role="fewshot"),
                  config={"MODEL": {"BACKBONE": {"NAME": "ViT-B/16"}}},
                  cost=dict(train_peak_mb=peak_mb, train_peak_method=meter))
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(record, f)


def _run(tmp_path, jobs: list[dict], lanes: list[Lane] | None = None, *, probe: bool = True, default_mb: float = 900.0,
         overhead_mb: float = 100.0):
    root, events = str(tmp_path / "out"), str(tmp_path / "events.jsonl")
    fakes = [fake_job(root, events=events, **j) for j in jobs]
    lanes = lanes or [Lane(devices=[0, 1], slots=1, tasks=["t"])]
    executor = LocalExecutor()
    placement = MemoryPlacement(lanes, BUDGET, PeakEstimator(root, overhead_mb=overhead_mb), default_mb=default_mb,
                                probe=ExecutorProber(executor, str(tmp_path / "probes")) if probe else None)
    result = Scheduler(fakes, lanes, executor, poll_s=0.02, placement=placement).run()
    records = {}
    for j in fakes:
        with open(os.path.join(j.out, "result.json")) as f:
            records[os.path.basename(j.out)] = json.load(f)
    return result, read_events(events), records


def _spans(events: list[dict]) -> list[tuple[str, float, float, str, int]]:
    """(job, start, end, device, attempt) of every job attempt (probes excluded)."""
    starts = {}
    out = []
    for e in events:
        if e["event"] == "start":
            starts[e["name"]] = e
        elif e["event"] == "end":
            s = starts.pop(e["name"])
            out.append((e["name"], s["t"], e["t"], s["cuda"], s["attempt"]))
    return out


def _overlapping(spans, name: str, attempt: int) -> list[str]:
    mine = next(s for s in spans if s[0] == name and s[4] == attempt)
    return [s[0] for s in spans if s is not mine and s[3] == mine[3] and s[1] < mine[2] and mine[1] < s[2]]


def test_packing_never_exceeds_the_budget_and_runs_jobs_together_when_they_fit(tmp_path):
    root = str(tmp_path / "out")
    peaks = {"small": 500.0, "mid": 800.0, "large": 1500.0}
    for key, peak in peaks.items():
        _history(root, key, peak)
    jobs = [dict(name=f"j{i}", dataset=key, peak_mb=peaks[key], sleep=0.6)
            for i, key in enumerate(["large", "small", "mid", "small", "large", "mid", "small", "small"])]
    result, events, records = _run(tmp_path, jobs, probe=False)
    assert result.counts["success"] == len(jobs)
    spans = _spans(events)
    estimate = {name: r["runner"]["memory_estimate_mb"] for name, r in records.items()}
    assert estimate["j0"] == 1600.0 and all(r["runner"]["memory_estimate_source"] == "record"
                                            for r in records.values())
    true_peak = {j["name"]: j["peak_mb"] for j in jobs}
    most_together = 0
    for name, start, _, device, _ in spans:  # memory in use changes only when a job starts
        on_device = [s[0] for s in spans if s[3] == device and s[1] <= start < s[2]]
        assert sum(estimate[n] for n in on_device) <= BUDGET, (name, on_device)
        assert sum(true_peak[n] for n in on_device) <= BUDGET
        most_together = max(most_together, len(on_device))
    assert most_together >= 2, "jobs that fit together should share a device"
    assert {s[3] for s in spans} == {"0", "1"}


def test_an_unknown_key_is_probed_once_and_its_jobs_use_the_measured_peak(tmp_path):
    jobs = [dict(name=f"p{i}", dataset="unknown", probe_mb=700.0, probe_sleep=0.3, peak_mb=650.0, sleep=0.2)
            for i in range(3)]
    result, events, records = _run(tmp_path, jobs)
    assert result.counts["success"] == 3
    probes = [e for e in events if e["event"] == "probe_start"]
    assert len(probes) == 1, "one probe per key"
    first_start = min(e["t"] for e in events if e["event"] == "start")
    assert next(e["t"] for e in events if e["event"] == "probe_end") <= first_start
    for r in records.values():
        assert (r["runner"]["memory_estimate_mb"], r["runner"]["memory_estimate_source"]) == (800.0, "probe")
    assert not os.path.exists(os.path.join(tmp_path, "out", "p0", "peak.json"))  # the probe wrote elsewhere
    assert os.path.exists(os.path.join(tmp_path, "probes"))


@pytest.mark.parametrize("case", ["probing off", "probe fails"])
def test_without_a_measurement_the_default_is_used_and_said(tmp_path, caplog, case):
    jobs = [dict(name="d0", dataset="unknown", probe_fail=True, sleep=0.1)]
    with caplog.at_level(logging.WARNING, logger="vltune.runner.packing"):
        result, events, records = _run(tmp_path, jobs, probe=case == "probe fails", default_mb=900.0)
    assert result.counts["success"] == 1
    assert (records["d0"]["runner"]["memory_estimate_mb"], records["d0"]["runner"]["memory_estimate_source"]) == (
        1000.0, "default")
    why = "probing is off" if case == "probing off" else "its probe failed"
    assert any(why in r.message and "using the default 1000 MB" in r.message for r in caplog.records), caplog.text
    assert sum(e["event"] == "probe_start" for e in events) == (case == "probe fails")


def test_an_out_of_memory_failure_is_retried_once_alone_and_recorded(tmp_path):
    root = str(tmp_path / "out")
    _history(root, "small", 300.0)
    jobs = [dict(name="big", dataset="small", oom=1, sleep=0.5)] + [
        dict(name=f"s{i}", dataset="small", sleep=0.5) for i in range(5)]
    result, events, records = _run(tmp_path, jobs, lanes=[Lane(devices=[0], slots=1, tasks=["t"])], probe=False)
    assert result.counts["success"] == 6
    spans = _spans(events)
    assert [s[4] for s in spans if s[0] == "big"] == [1, 2]
    assert _overlapping(spans, "big", 1), "the first attempt was packed with others"
    assert _overlapping(spans, "big", 2) == [], "the retry runs alone on its device"
    retry = records["big"]["runner"]["oom_retry"]
    assert "CUDA out of memory" in retry["first_error"]
    assert (retry["estimate_mb_before"], retry["estimate_mb_after"]) == (400.0, 600.0)
    assert records["big"]["runner"]["memory_estimate_mb"] == 600.0
    assert "oom_retry" not in records["s1"]["runner"]


def test_a_second_out_of_memory_failure_is_final(tmp_path):
    jobs = [dict(name="big", dataset="k", oom=2, sleep=0.1), dict(name="after", dataset="k", depends_on="big")]
    result, events, records = _run(tmp_path, jobs, probe=False)
    assert result.counts == {"failed": 1, "skipped": 1}
    assert [s[4] for s in _spans(events) if s[0] == "big"] == [1, 2]
    assert records["big"]["status"] == "failed" and "oom_retry" in records["big"]["runner"]
    assert "CUDA out of memory" in records["big"]["runner"]["log_tail"]


def test_lanes_dependencies_and_failures_hold_under_packing(tmp_path):
    lanes = [Lane(devices=[0], slots=1, tasks=["a"]), Lane(devices=[1], slots=1, tasks=["b"])]
    jobs = [dict(name="tr1", task="a", dataset="k", sleep=0.4), dict(name="ev1", task="a", dataset="k",
                                                                     depends_on="tr1"),
            dict(name="tr2", task="a", dataset="k", fail=3), dict(name="ev2", task="a", dataset="k", depends_on="tr2"),
            dict(name="tr3", task="a", dataset="k", sleep=0.2)] + [
        dict(name=f"b{i}", task="b", dataset="k", sleep=0.2) for i in range(4)]
    # 1000 MB per job under a 2000 MB budget: two jobs per device at once, started in lane order
    result, events, records = _run(tmp_path, jobs, lanes=lanes, probe=False, default_mb=900.0)
    assert result.counts == {"success": 7, "failed": 1, "skipped": 1}
    assert records["tr2"]["status"] == "failed" and records["ev2"]["status"] == "skipped"
    spans = {s[0]: s for s in _spans(events)}
    assert spans["ev1"][1] >= spans["tr1"][2], "an evaluation starts after its train job succeeded"
    assert {spans[n][3] for n in ("tr1", "ev1", "tr3")} == {"0"} and {spans[f"b{i}"][3] for i in range(4)} == {"1"}
    starts = [e["name"] for e in events if e["event"] == "start" and e["name"].startswith("b")]
    assert starts == ["b0", "b1", "b2", "b3"], "lane order"
    assert max(len(_overlapping(list(spans.values()), f"b{i}", 1)) for i in range(4)) == 1, "two per device"


def test_probe_mode_of_train_py_measures_without_running_the_job(tmp_path, monkeypatch, digits_root,
                                                                 random_clip_weights):
    out, file = str(tmp_path / "job"), str(tmp_path / "probe" / "peak.json")
    argv = ["--root", digits_root, "--seed", "1", "--trainer", "CoOp", "--dataset-config-file",
            str(REPO / "configs/datasets/digits.yaml"), "--config-file",
            str(REPO / "configs/trainers/CoOp/tiny_ep10.yaml"), "--output-dir", out, "MODEL.BACKBONE.WEIGHTS",
            random_clip_weights, "USE_CUDA", "False", "DATASET.NUM_SHOTS", "2"]
    monkeypatch.setenv("VLTUNE_PROBE_MEMORY", file)
    assert train.main(argv, console=False) == 0
    with open(file) as f:
        measured = json.load(f)
    assert measured["method"] == "cpu_profiler_tensor_bytes"
    assert measured["peak_mb"] == max(measured["train_peak_mb"], measured["eval_peak_mb"]) > 0
    assert measured["train_peak_mb"] is not None, "a trained job's probe runs a training step"
    assert not os.path.exists(out), "nothing of the job is written"
    monkeypatch.setenv("VLTUNE_PROBE_MEMORY", str(tmp_path / "bad" / "peak.json"))
    assert train.main([*argv, "MODEL.BACKBONE.WEIGHTS", str(tmp_path / "missing.pt")], console=False) == 1


def test_schedule_settings_are_validated():
    assert ScheduleSettings.from_dict({}).packing == "slots"
    with pytest.raises(SuiteError) as e:
        ScheduleSettings.from_dict({"packing": "memroy", "headrom": 0.1, "headroom": 1.5, "default_gb": "4"})
    text = str(e.value)
    assert "did you mean memory" in text and "'headrom'" in text and "did you mean headroom" in text
    assert "'default_gb' = '4'" in text and "(did you mean 4?)" in text
    assert "headroom'] = 1.5" not in text  # values are checked once their types are right


def _suite(tmp_path, digits_root, weights, schedule: str) -> str:
    path = tmp_path / "configs.py"
    path.write_text(textwrap.dedent(f"""
        base = dict(data=dict(root={digits_root!r}), model=dict(backbone="vltune-tiny", weights={weights!r}),
                    output=dict(root="out"), schedule={schedule})
        coop = dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"], seeds=[1])
        pipeline = [dict(gpu_ids=[], tasks=["coop"])]
        """))
    return str(path)


def test_memory_packing_on_the_cpu_needs_a_budget_and_dry_run_prints_estimates(tmp_path, capsys, digits_root,
                                                                               random_clip_weights):
    path = _suite(tmp_path, digits_root, random_clip_weights, "dict(packing='memory')")
    with pytest.raises(SuiteError, match="packing='memory' on the CPU.*gpu_memory_gb"):
        load_experiments(path, str(REPO))
    path = _suite(tmp_path, digits_root, random_clip_weights, "dict(packing='memory', gpu_memory_gb=8, probe=False)")
    assert parallel_runner.main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("[4608 MB, default]") == 2  # 4 GB default + 0.5 GB overhead, for both jobs
    assert "budget per device cpu: 7373 MB" in out  # 8 GB minus 10 % headroom
    assert not (tmp_path / "out").exists()


def test_a_placement_that_holds_back_every_ready_job_with_nothing_running_is_an_error(tmp_path):
    """No endless wait: when nothing runs, nothing is being probed and the placement places no ready job, the run
    stops with an error naming a held-back job (a job too big for every device, without packing's run-alone rule)."""
    class Never(SlotPlacement):
        def place(self, state, devices, running):
            return None

    job = fake_job(str(tmp_path), "a", str(tmp_path / "events.jsonl"))
    with pytest.raises(SuiteError, match="holds back every ready job.*a"):
        Scheduler([job], [Lane([0], 1, ["t"])], LocalExecutor(), poll_s=0.01, placement=Never([Lane([0], 1, ["t"])])
                  ).run()
