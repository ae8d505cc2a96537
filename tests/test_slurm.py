"""The runner on a real single-node SLURM cluster (``tests/slurm_cluster.py``: munged, slurmctld and slurmd started
here, everything under a temp folder): a MiniBench suite with dependencies gives the same accuracies as the local
executor; a job ``scancel``ed from outside is recorded failed and its dependents skipped while the rest finish; Ctrl-C
of the driver cancels exactly this run's SLURM jobs; a driver killed with -9 and restarted re-attaches to its queued
and running jobs and submits only the missing ones; a requeued job runs again and succeeds; the progress lines tell
queued from running jobs. The fixture stops exactly the daemons it started."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import REPO
from fakejobs import fake_job, read_events, run_spec
from procs import default_sigint
from slurm_cluster import SlurmCluster

from vltune.runner.progress import Progress
from vltune.runner.scheduler import Lane, Scheduler
from vltune.runner.slurm_executor import SlurmExecutor, import_submitit

import_submitit()  # make test installs requirements-slurm.txt; a missing submitit is an error here, not a skip
pytestmark = [pytest.mark.slurm]
FAKE_DRIVER = str(REPO / "tests" / "fakejobs.py")


@pytest.fixture(scope="module")
def cluster():
    """The running cluster; ``SLURM_CONF`` is set in this process for the clients while it runs."""
    folder = tempfile.mkdtemp(prefix="vlslurm", dir="/tmp")
    try:
        c = SlurmCluster(folder).start()  # stops what it started when it fails, and says why
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    old = os.environ.get("SLURM_CONF")
    os.environ.update(c.env())
    try:
        yield c
    finally:
        c.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        left = c.running()
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"daemons left running: {left}"


def _executor(**kw) -> dict:
    return dict(gpus_per_job=0, cpus_per_task=1, time=10, repo=str(REPO), poll_s=0.3, **kw)


def _spec(root, jobs, slots: int = 4) -> dict:
    return dict(root=str(root), events=str(root / "events.jsonl"), jobs=jobs, slurm=_executor(),
                lanes=[dict(devices=["slurm:0"], slots=slots, tasks=["t"])])


def _ids(root, names) -> dict[str, str]:
    """name -> the SLURM job id its folder names (jobs submitted so far)."""
    ids = {}
    for name in names:
        path = root / name / "slurm_job.json"
        if path.exists():
            ids[name] = json.loads(path.read_text())["job_id"]
    return ids


def _queue() -> dict[str, str]:
    """job id -> state of every job the cluster still knows about that has not ended."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("|") for line in out.split())


def _wait(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _suite(path, executor: str, schedule: str = "") -> str:
    path.write_text(f"base = dict(data=dict(root='data'), model=dict(backbone='vltune-tiny'), output=dict(root='o'),"
                    f" executor={executor}"
                    f"{', schedule=' + schedule if schedule else ''})\n"
                    "zs = dict(trainer='ZeroshotCLIP', config='tiny', protocol='b2n', datasets=['digits'],"
                    " eval_only=True)\nzs2 = dict(zs, protocol='fewshot')\n"
                    # GPU ids this driver does not have: with SLURM they are not checked here
                    "pipeline = [dict(gpu_ids=[0, 1], tasks=['zs']), dict(gpu_ids=[], tasks=['zs2'])]\n")
    return str(path)


@pytest.mark.parametrize(("executor", "match"), [
    ("dict(kind='slurmm')", "'slurmm' (did you mean slurm?)"),
    ("dict(kind='slurm', partitions='gpu')", "unknown key 'partitions'"),
    ("dict(kind='slurm', gpus_per_job='1')", "'gpus_per_job' = '1'"),
    ("dict(kind='slurm', array_parallelism=0)", "'array_parallelism'] = 0; it must be > 0"),
    ("dict(kind='slurm', time=1.5)", "expected minutes"),
])
def test_bad_slurm_settings_are_refused_before_work_starts(executor, match, tmp_path, capsys):
    import parallel_runner

    assert parallel_runner.main(["--config", _suite(tmp_path / "configs.py", executor), "--dry-run"]) == 2
    assert match in capsys.readouterr().err


def test_memory_packing_with_slurm_is_refused(tmp_path):
    import parallel_runner

    configs = _suite(tmp_path / "configs.py", "dict(kind='slurm')", "dict(packing='memory', gpu_memory_gb=8)")
    args = parallel_runner.build_parser().parse_args(["--config", configs])
    experiments = parallel_runner.load_experiments(configs, str(REPO))
    with pytest.raises(parallel_runner.SuiteError, match="needs the local executor .SLURM places"):
        parallel_runner.placement_of(experiments, [], None, args)


def test_each_stage_is_a_lane_of_array_parallelism_slots(tmp_path):
    import parallel_runner

    configs = _suite(tmp_path / "configs.py", "dict(kind='slurm', array_parallelism=5)")
    lanes = parallel_runner.slurm_lanes(parallel_runner.load_experiments(configs, str(REPO)))
    assert [(lane.devices, lane.slots, lane.tasks) for lane in lanes] == [(["slurm:0"], 5, ["zs"]),
                                                                         (["slurm:1"], 5, ["zs2"])]


def test_without_submitit_the_runner_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    with pytest.raises(ImportError, match="executor 'slurm' was chosen but submitit is not installed.*"
                                          "pip install -r requirements-slurm.txt"):
        SlurmExecutor()


def test_gpus_are_requested_per_job_in_the_sbatch_script(cluster, tmp_path):
    """The settings of ``base['executor']`` reach sbatch. It takes the cluster fixture only for SLURM's commands
    (installed by it on a clean machine), which the executor needs on PATH."""
    from submitit.slurm.slurm import _make_sbatch_string

    import parallel_runner

    configs = _suite(tmp_path / "configs.py", "dict(kind='slurm', partition='gpu', account='lab', "
                     "time='1-00:00:00', gpus_per_job=2, cpus_per_task=8, mem_gb=32, additional_parameters="
                     "dict(qos='high'))")
    args = parallel_runner.build_parser().parse_args(["--config", configs])
    executor, _ = parallel_runner.make_executor(parallel_runner.load_experiments(configs, str(REPO)), args)
    script = _make_sbatch_string(command="run", folder=str(tmp_path), **executor.parameters)
    for line in ("--gres=gpu:2", "--partition=gpu", "--account=lab", "--time=1-00:00:00", "--cpus-per-task=8",
                 "--mem=32GB", "--requeue", "--qos=high", f"export PYTHONPATH={REPO}"):
        assert line in script, line


@pytest.mark.slow
def test_a_minibench_suite_gives_the_same_records_as_local(cluster, minibench, tmp_path):
    root, weights = minibench
    configs = tmp_path / "configs.py"
    configs.write_text(
        f"base = dict(data=dict(root={root!r}),\n"
        f"            model=dict(backbone='vltune-tiny', weights={weights!r}), output=dict(root='out'),\n"
        "            slots_per_gpu=2, executor=dict(kind='local', gpus_per_job=0, cpus_per_task=1, time=10,\n"
        "                                          poll_s=0.3, array_parallelism=4))\n"
        "coop = dict(trainer='CoOp', config='mini', protocol='b2n', datasets=['digits'], seeds=[1, 2, 3],\n"
        "            shots=2, opts=['OPTIM.MAX_EPOCH', '2'])\n"
        "pipeline = [dict(gpu_ids=[], tasks=['coop'])]\n")
    accuracies, wall = {}, {}
    for kind in ("local", "slurm"):
        started = time.time()
        run = subprocess.run([sys.executable, str(REPO / "parallel_runner.py"), "--config", str(configs), "--plain",
                              "--no-mail", "--executor", kind, "--cold"], capture_output=True, text=True,
                             cwd=tmp_path, env={**os.environ, "VLTUNE_CACHE_DIR": str(tmp_path / "cache")})
        wall[kind] = time.time() - started
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        out = tmp_path / kind
        shutil.move(str(tmp_path / "out"), str(out))
        records = [json.loads(p.read_text()) for p in out.rglob("result.json")]
        assert len(records) == 6 and {r["status"] for r in records} == {"success"}
        accuracies[kind] = {(r["job"]["seed"], r["job"]["role"]): r["metrics"]["accuracy"] for r in records}
        if kind == "slurm":
            assert "slurm: 6 jobs submitted, 0 re-attached" in run.stdout
            assert {r["runner"]["device"] for r in records} == {"slurm:0"}
            ids = {json.loads(p.read_text())["job_id"] for p in out.rglob("slurm_job.json")}
            assert len(ids) == 6
            evals = [p for p in out.rglob("result.json") if json.loads(p.read_text())["job"]["phase"] == "eval"]
            assert len(evals) == 3
            for path in evals:  # submitit's folder beside result.json: script, pickles, logs
                names = os.listdir(path.parent / "slurm")
                assert any(n.endswith("_submission.sh") for n in names) and any(n.endswith("_result.pkl")
                                                                                for n in names)
    assert len({k[1] for k in accuracies["local"]}) == 2  # train (base) and eval (new) jobs
    assert accuracies["slurm"] == accuracies["local"]
    print(f"wall: local {wall['local']:.1f} s, slurm {wall['slurm']:.1f} s")


@pytest.mark.slow
def test_progress_tells_queued_from_running_jobs(cluster, tmp_path):
    """Three 1-CPU jobs on the 2-CPU node: SLURM runs two and holds one queued, and the progress lines say so."""
    spec = _spec(tmp_path, [dict(name=f"j{i}", sleep=4) for i in range(3)])
    jobs = [fake_job(spec["root"], events=spec["events"], **j) for j in spec["jobs"]]
    stream = io.StringIO()
    progress = Progress(stream=stream, live=False)
    scheduler = Scheduler(jobs, [Lane(**lane) for lane in spec["lanes"]], SlurmExecutor(**spec["slurm"]),
                          poll_s=0.2, on_event=progress.event)
    progress.attach(scheduler)
    seen = []
    result = scheduler.run(tick=lambda: seen.append(progress.counts()))
    assert dict(result.counts) == {"success": 3}
    assert any(c["queued"] >= 1 and c["running"] - c["queued"] >= 1 for c in seen)  # both at once
    assert seen[-1]["queued"] == 0
    lines = stream.getvalue().splitlines()
    assert sum(line.startswith("queued ") for line in lines) == 3  # each submission is shown queued first
    assert any("of them queued)" in line for line in lines)


@pytest.mark.slow
def test_scancel_of_one_job_fails_it_and_skips_its_dependents(cluster, tmp_path):
    jobs = [dict(name="victim", sleep=60), dict(name="victim_eval", depends_on="victim"),
            dict(name="ok", sleep=1), dict(name="ok_eval", depends_on="ok")]
    spec = _spec(tmp_path, jobs)
    cancelled = []

    def tick():
        if not cancelled and any(e["event"] == "start" and e["name"] == "victim" for e in read_events(spec["events"])):
            job_id = _ids(tmp_path, ["victim"])["victim"]
            subprocess.run(["scancel", job_id], check=True)
            cancelled.append(job_id)

    result = run_spec(spec, executor=SlurmExecutor(**spec["slurm"]), tick=tick)
    status = {s.job.role: s.status for s in result.states}
    assert cancelled and status == {"victim": "failed", "victim_eval": "skipped", "ok": "success",
                                    "ok_eval": "success"}
    record = json.loads((tmp_path / "victim" / "result.json").read_text())
    assert "CANCELLED" in record["runner"]["log_tail"] and record["runner"]["exit_code"] == -signal.SIGTERM


def _driver(spec_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, FAKE_DRIVER, str(spec_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


@pytest.mark.slow
def test_ctrl_c_of_the_driver_cancels_exactly_its_jobs(cluster, tmp_path):
    other = subprocess.run(["sbatch", "--parsable", "-J", "other", "-o", "/dev/null", "--wrap", "sleep 60"],
                           capture_output=True, text=True, check=True).stdout.strip()
    driver, ids = None, {}
    try:
        names = [f"long{i}" for i in range(3)]
        spec = _spec(tmp_path, [dict(name=n, sleep=60) for n in names])
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        driver = _driver(tmp_path / "spec.json")
        ids = _wait(lambda: (lambda d: d if len(d) == 3 else None)(_ids(tmp_path, names)), 30, "3 submissions")
        _wait(lambda: "RUNNING" in {_queue().get(i) for i in ids.values()}, 30, "a job of the run running")
        assert set(ids.values()) <= set(_queue())
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=120)  # a loaded CI machine: the controller answers slowly
        assert driver.returncode == 130, out + err
        queue = _queue()
        assert not set(ids.values()) & set(queue)  # every job of this run is gone from the queue …
        assert other in queue  # … and the other user's job is not
        statuses = {json.loads((tmp_path / n / "result.json").read_text())["status"] for n in names}
        assert statuses == {"cancelled"}
    finally:  # whatever failed, leave the cluster free for the next test
        if driver is not None and driver.poll() is None:
            driver.kill()
        subprocess.run(["scancel", other, *ids.values()])


@pytest.mark.slow
def test_a_driver_killed_with_9_reattaches_and_submits_only_the_missing_jobs(cluster, tmp_path):
    jobs = [dict(name="a", sleep=8), dict(name="a_eval", depends_on="a"), dict(name="b", sleep=8),
            dict(name="c", sleep=8)]
    spec = _spec(tmp_path, jobs)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    first = _driver(tmp_path / "spec.json")
    ids = _wait(lambda: (lambda d: d if len(d) == 3 else None)(_ids(tmp_path, ["a", "b", "c"])), 30,
                "3 submissions")
    _wait(lambda: "RUNNING" in {_queue().get(i) for i in ids.values()}, 30, "a job running")
    first.kill()  # SIGKILL: no cleanup, its SLURM jobs stay queued / running
    first.communicate()
    active = set(ids.values()) & set(_queue())
    assert active  # there is something to re-attach to
    second = _driver(tmp_path / "spec.json")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, out + err
    counts, slurm = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert counts == {"success": 4}
    assert slurm["submitted"] == [_ids(tmp_path, ["a_eval"])["a_eval"]]  # only the missing job is submitted
    assert set(slurm["attached"]) <= set(ids.values()) and len(slurm["attached"]) >= 1
    starts = [e["name"] for e in read_events(spec["events"]) if e["event"] == "start"]
    assert sorted(starts) == ["a", "a_eval", "b", "c"]  # nothing ran twice


@pytest.mark.slow
def test_a_requeued_job_runs_again_and_succeeds(cluster, tmp_path):
    spec = _spec(tmp_path, [dict(name="preempted", sleep=6)])
    requeued = []

    def tick():
        if not requeued and any(e["event"] == "start" for e in read_events(spec["events"])):
            job_id = _ids(tmp_path, ["preempted"])["preempted"]
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            requeued.append(job_id)
        elif requeued and len(requeued) == 1 and _queue().get(requeued[0]) == "PENDING":
            # SLURM holds a requeued job back for about two minutes (its begin time); let it start now
            subprocess.run(["scontrol", "update", f"JobId={requeued[0]}", "StartTime=now"], check=True)
            requeued.append("released")

    result = run_spec(spec, executor=SlurmExecutor(**spec["slurm"]), tick=tick)
    assert requeued[1:] == ["released"] and result.states[0].status == "success"
    attempts = [e["attempt"] for e in read_events(spec["events"]) if e["event"] == "start"]
    assert attempts == [1, 2]  # the same SLURM job ran its script again


@pytest.mark.slow
def test_a_requeued_training_resumes_from_its_last_checkpoint(cluster, digits_root, tiny_clip_weights, tmp_path):
    """Preemption: ``scontrol requeue`` of a running train.py job; SLURM runs it again and vltune's auto-resume
    continues from the newest checkpoint instead of starting over."""
    from vltune.runner.jobs import Job
    from vltune.runner.scheduler import Lane, Scheduler

    out = tmp_path / "coop"
    argv = [sys.executable, str(REPO / "train.py"), "--root", digits_root, "--seed", "1", "--trainer", "CoOp",
            "--dataset-config-file", str(REPO / "configs/datasets/digits.yaml"), "--config-file",
            str(REPO / "configs/trainers/CoOp/tiny_ep10.yaml"), "--output-dir", str(out), "DATASET.NUM_SHOTS", "16",
            "OPTIM.MAX_EPOCH", "60", "MODEL.BACKBONE.WEIGHTS", tiny_clip_weights, "USE_CUDA", "False"]
    job = Job(task="t", out=str(out), argv=argv, role="train", dataset="digits", trainer="CoOp")
    requeued = []

    def tick():
        log = out / "log.txt"
        if not requeued and log.exists() and "epoch [5/60] means" in log.read_text():
            job_id = json.loads((out / "slurm_job.json").read_text())["job_id"]
            subprocess.run(["scontrol", "requeue", job_id], check=True)
            requeued.append(job_id)
        elif len(requeued) == 1 and _queue().get(requeued[0]) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={requeued[0]}", "StartTime=now"], check=True)
            requeued.append("released")

    result = Scheduler([job], [Lane(["slurm:0"], 1, ["t"])], SlurmExecutor(**{**_executor(), "time": 20}),
                       poll_s=0.2).run(tick=tick)
    assert requeued[1:] == ["released"], requeued
    record = json.loads((out / "result.json").read_text())
    assert result.states[0].status == "success" and record["status"] == "success", record.get("error")
    assert record["job"]["resumed_from_epoch"] >= 5, record["job"]  # continued, not started over
