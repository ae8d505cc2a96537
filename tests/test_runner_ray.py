"""The runner on a Ray cluster: a local cluster started here (a head node and a second node process with its own
resources, temp files under a folder the test chooses) runs fake-job suites and a tiny MiniBench task with the same
results as the local executor; a killed worker's job is retried, or recorded failed once retries are spent; Ctrl-C
cancels only this run's tasks; nothing the test started is left running."""

from __future__ import annotations

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
from fakejobs import read_events, run_spec

from vltune.runner.executor import CPU
from vltune.runner.ray_executor import RAY_DEVICE, RayExecutor, import_ray

ray = import_ray()  # CI installs requirements-ray.txt; a missing Ray is an error here, not a skip
pytestmark = pytest.mark.ray  # the Ray executor's tests: -m ray selects them; those on the cluster are also slow


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def cluster():
    """(cluster, its temp folder): a head node (2 CPUs) and a worker node (1 CPU, resource 'second_node')."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="vlray", dir="/tmp")  # short: Ray's socket paths live under it
    os.makedirs(os.path.join(tmp, "ray"))
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, temp_dir=os.path.join(tmp, "ray"),
                                                          include_dashboard=False))
    c.add_node(num_cpus=1, resources={"second_node": 1})
    try:
        yield c, tmp
    finally:
        ray.shutdown()
        c.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        deadline = time.time() + 20
        while _processes_mentioning(tmp) and time.time() < deadline:
            time.sleep(0.5)
        left = _processes_mentioning(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def executor(cluster):
    c, _ = cluster
    return RayExecutor(c.address, max_retries=2, slots_per_gpu=1, repo=str(REPO))


def _spec(root, jobs, lane):
    return dict(root=str(root), events=str(root / "events.jsonl"), lanes=[lane], jobs=jobs)


SUITE = [dict(name="train_a", sleep=0.5), dict(name="eval_a", depends_on="train_a"),
         dict(name="train_b", fail=3), dict(name="eval_b", depends_on="train_b"), dict(name="c", sleep=0.2)]


@pytest.mark.slow
def test_the_cluster_has_two_nodes_and_temp_files_where_chosen(cluster, executor):
    c, tmp = cluster
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert ray.cluster_resources()["second_node"] == 1
    assert os.listdir(os.path.join(tmp, "ray"))  # session folders under the test's folder
    assert _processes_mentioning(tmp)  # the check at teardown can see the cluster's processes
    assert executor.gpus_per_job == 0 and executor.cluster_slots() == 3


@pytest.mark.slow
def test_a_fake_suite_gives_the_same_results_as_the_local_executor(tmp_path, executor):
    local = run_spec(_spec(tmp_path / "local", SUITE, dict(devices=[CPU], slots=2, tasks=["t"])))
    remote = run_spec(_spec(tmp_path / "ray", SUITE, dict(devices=[RAY_DEVICE], slots=3, tasks=["t"])),
                      executor=executor)
    statuses = {s.job.role: s.status for s in local.states}
    assert statuses == {"train_a": "success", "eval_a": "success", "train_b": "failed", "eval_b": "skipped",
                        "c": "success"}
    assert {s.job.role: s.status for s in remote.states} == statuses
    events = read_events(str(tmp_path / "ray" / "events.jsonl"))
    starts = {e["name"]: e["t"] for e in events if e["event"] == "start"}
    ends = {e["name"]: e["t"] for e in events if e["event"] == "end"}
    assert starts["eval_a"] >= ends["train_a"]  # an evaluation waits for its training job
    record = json.loads((tmp_path / "ray" / "train_b" / "result.json").read_text())
    assert record["status"] == "failed" and "failed on purpose" in record["runner"]["log_tail"]


def _kill_worker_once(events: str, name: str):
    """A scheduler tick that SIGKILLs the Ray worker running ``name`` the first time that job has started."""
    killed = []

    def tick():
        if killed:
            return
        for e in read_events(events):
            if e["event"] == "start" and e["name"] == name:
                os.kill(e["ppid"], signal.SIGKILL)  # the job's parent is its Ray worker
                killed.append(e["ppid"])
                return

    return tick, killed


@pytest.mark.slow
@pytest.mark.parametrize("retries", [2, 0])
def test_a_job_whose_worker_dies_is_retried_then_recorded_failed(retries, cluster, tmp_path):
    c, _ = cluster
    executor = RayExecutor(c.address, max_retries=retries, repo=str(REPO))
    jobs = [dict(name="victim", sleep=3), dict(name="other", sleep=0.5)]
    spec = _spec(tmp_path, jobs, dict(devices=[RAY_DEVICE], slots=3, tasks=["t"]))
    tick, killed = _kill_worker_once(spec["events"], "victim")
    result = run_spec(spec, executor=executor, tick=tick)
    status = {s.job.role: s.status for s in result.states}
    starts = [e for e in read_events(spec["events"]) if e["event"] == "start" and e["name"] == "victim"]
    assert killed and status["other"] == "success"
    if retries:
        assert status["victim"] == "success" and len(starts) == 2  # run again on a fresh worker
    else:
        assert status["victim"] == "failed" and len(starts) == 1
        assert "did not finish" in (tmp_path / "victim" / "stderr.log").read_text()


@pytest.mark.slow
def test_ctrl_c_cancels_only_this_runs_tasks(executor, tmp_path):
    marker = tmp_path / "other_driver_done"

    def other_work(path: str) -> str:
        time.sleep(3)
        with open(path, "w") as f:
            f.write("done")
        return "done"

    other = ray.remote(num_cpus=0)(other_work).remote(str(marker))
    jobs = [dict(name=f"long{i}", sleep=60) for i in range(2)]
    spec = _spec(tmp_path, jobs, dict(devices=[RAY_DEVICE], slots=3, tasks=["t"]))

    def tick():
        if len([e for e in read_events(spec["events"]) if e["event"] == "start"]) == 2:
            raise KeyboardInterrupt

    result = run_spec(spec, executor=executor, tick=tick)
    assert result.interrupted and {s.status for s in result.states} == {"cancelled"}
    assert ray.get(other, timeout=30) == "done" and marker.read_text() == "done"


@pytest.mark.slow
def test_a_tiny_minibench_task_gives_the_same_tables_as_local(cluster, digits_root, tiny_clip_weights, tmp_path):
    c, _ = cluster
    configs = tmp_path / "configs.py"
    configs.write_text(
        f"base = dict(data=dict(root={digits_root!r}),\n"
        f"            model=dict(backbone='vltune-tiny', weights={tiny_clip_weights!r}), output=dict(root='out'),\n"
        f"            executor=dict(kind='local', address={c.address!r}, max_retries=1))\n"
        "coop = dict(trainer='CoOp', config='tiny_ep10', protocol='b2n', datasets=['digits'], seeds=[1], shots=2,\n"
        "            opts=['OPTIM.MAX_EPOCH', '2', 'TRAINER.COOP.N_CTX', '4'])\n"
        "pipeline = [dict(gpu_ids=[], tasks=['coop'])]\n")
    tables = {}
    for kind in ("local", "ray"):
        out = tmp_path / kind
        run = subprocess.run([sys.executable, str(REPO / "parallel_runner.py"), "--config", str(configs), "--plain",
                              "--no-mail", "--executor", kind, "--gpus", "cpu"], capture_output=True, text=True,
                             cwd=tmp_path, env={**os.environ, "VLTUNE_CACHE_DIR": str(tmp_path / "cache")})
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        shutil.move(str(tmp_path / "out"), str(out))
        tables[kind] = (out / "tables" / "coop.b2n.csv").read_text()
        records = [json.loads(p.read_text()) for p in out.rglob("result.json")]
        assert len(records) == 2 and {r["runner"]["device"] for r in records} == {RAY_DEVICE if kind == "ray" else CPU}
    assert tables["ray"] == tables["local"] and "Digits" in tables["local"]


def _zero_shot_suite(path, executor: str, root: str = "data", weights: str = "") -> str:
    path.write_text(f"base = dict(data=dict(root={root!r}), model=dict(backbone='vltune-tiny', weights={weights!r}),"
                    f" output=dict(root='o'), executor={executor})\n"
                    "zs = dict(trainer='ZeroshotCLIP', config='tiny', protocol='b2n',"
                    " datasets=['digits'], eval_only=True)\npipeline = [dict(gpu_ids=[], tasks=['zs'])]\n")
    return str(path)


def test_without_ray_the_runner_says_how_to_install_it(monkeypatch, tmp_path, capsys, digits_root,
                                                       tiny_clip_weights):
    import parallel_runner

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ImportError, match="pip install -r requirements-ray.txt"):
        import_ray()
    configs = _zero_shot_suite(tmp_path / "configs.py", "dict(kind='ray')", digits_root, tiny_clip_weights)
    assert parallel_runner.main(["--config", configs, "--plain", "--no-mail"]) == 2
    assert "executor 'ray' was chosen but Ray is not installed" in capsys.readouterr().err


@pytest.mark.parametrize(("executor", "match"), [("dict(kind='kubernetes')", "choose one of"),
                                                 ("dict(kind='ray', retries=3)", "retries"),
                                                 ("dict(kind='ray', max_retries=-1)", "must be >= 0")])
def test_bad_executor_settings_are_refused(executor, match, tmp_path, capsys):
    import parallel_runner

    configs = _zero_shot_suite(tmp_path / "configs.py", executor)
    assert parallel_runner.main(["--config", configs, "--dry-run"]) == 2
    assert match in capsys.readouterr().err
