"""Fake jobs for the runner tests: ``python -c`` processes that sleep, print, fail or spawn a grandchild, log their
start and end (time, pid, ``CUDA_VISIBLE_DEVICES``) to one JSON-lines file, and write ``result.json`` like
``train.py``. ``python tests/fakejobs.py SPEC.json`` runs a suite of them in a separate runner process (on the test
SLURM cluster when the spec has a ``slurm`` entry).

For memory packing (``vltune.runner.packing``) a fake job also has a memory key (trainer, config, dataset, shots,
backbone), records ``peak_mb`` as its training peak (``meter``: the CUDA or the CPU meter), can run out of memory
(its first ``oom`` attempts fail with torch's "CUDA out of memory" error in a failed ``result.json``), and answers
a probe like ``train.py`` (``VLTUNE_PROBE_MEMORY=FILE``: writes ``probe_mb``, or fails with ``probe_fail``)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vltune.runner.executor import LocalExecutor  # noqa: E402
from vltune.runner.jobs import Job  # noqa: E402
from vltune.runner.scheduler import Lane, Scheduler, SuiteResult  # noqa: E402

IDENTITY = {"fake.key": "fake value"}
SCRIPT = """
import json, os, subprocess, sys, time
out, events, name = {out!r}, {events!r}, {name!r}
def log(event, **kw):
    with open(events, "a") as f:
        f.write(json.dumps(dict(name=name, event=event, t=time.time(), pid=os.getpid(), ppid=os.getppid(),
                                cuda=os.environ.get("CUDA_VISIBLE_DEVICES"), **kw)) + "\\n")
probe = os.environ.get("VLTUNE_PROBE_MEMORY")
if probe:
    log("probe_start")
    time.sleep({probe_sleep!r})
    log("probe_end")
    if {probe_fail!r}:
        sys.exit("probe of " + name + " failed on purpose")
    with open(probe, "w") as f:
        json.dump(dict(peak_mb={probe_mb!r}, method={meter!r}), f)
    sys.exit(0)
with open(os.path.join(out, "attempts.txt"), "a") as f:
    f.write("x")
attempt = os.path.getsize(os.path.join(out, "attempts.txt"))
kid = subprocess.Popen(["sleep", "60"]) if {grandchild!r} else None
log("start", grandchild=kid.pid if kid else None, attempt=attempt)
print("working on", name)
time.sleep({sleep!r})
record = dict(job={job_info!r}, identity={identity!r}, config={config!r})
if attempt <= {oom!r}:
    error = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (fake job " + name + ")"
    print(error, file=sys.stderr)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(dict(record, status="failed", error=error), f)
    log("end", status="oom")
    sys.exit(1)
if {fail!r}:
    print("boom: job", name, "failed on purpose", file=sys.stderr)
    sys.exit({fail!r})
cost = dict(train_peak_mb={peak_mb!r}, train_peak_method={meter!r}) if {peak_mb!r} is not None else dict()
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(dict(record, status="success", metrics=dict(accuracy=50.0), cost=cost), f)
log("end")
if kid:
    kid.kill()
"""


BACKBONE = "ViT-B/16"
WEIGHTS = "fake-weights.pt"  # a named local file: the runner never tries to download weights for a fake job


def fake_job(root: str, name: str, events: str, *, sleep: float = 0.0, fail: int = 0, task: str = "t",
             depends_on: str = "", grandchild: bool = False, dataset: str = "", trainer: str = "Fake",
             shots: int = 0, peak_mb: float | None = None, meter: str = "cuda_max_allocated", oom: int = 0,
             probe_mb: float = 0.0, probe_fail: bool = False, probe_sleep: float = 0.0) -> Job:
    """A fake job named ``name`` (its folder, role and, unless given, dataset): see the module docstring."""
    out = os.path.join(root, name)
    dataset = dataset or name
    phase = "eval" if depends_on else "train"
    job_info = dict(trainer=trainer, config="fake_config", dataset=dataset, shots=shots, phase=phase,
                    protocol="fewshot", role="fewshot", task=task)
    code = SCRIPT.format(out=out, events=events, name=name, sleep=sleep, fail=fail, identity=IDENTITY,
                         grandchild=grandchild, job_info=job_info, config={"MODEL": {"BACKBONE": {"NAME": BACKBONE}}},
                         peak_mb=peak_mb, meter=meter, oom=oom, probe_mb=probe_mb, probe_fail=probe_fail,
                         probe_sleep=probe_sleep)
    argv = [sys.executable, "-c", code] + (["--eval-only"] if phase == "eval" else [])
    return Job(task=task, out=out, argv=argv, depends_on=os.path.join(root, depends_on) if depends_on else "",
               role=name, dataset=dataset, identity=dict(IDENTITY), trainer=trainer, config="fake_config",
               shots=shots, clip_weights=(BACKBONE, WEIGHTS, ""))


def read_events(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_spec(spec: dict[str, Any], executor: Any = None, tick: Any = None, **kw: Any) -> SuiteResult:
    """``spec``: root, events, lanes [{devices, slots, tasks}], jobs [{name, sleep, fail, task, depends_on, …}]."""
    jobs = [fake_job(spec["root"], events=spec["events"], **j) for j in spec["jobs"]]
    lanes = [Lane(**lane) for lane in spec["lanes"]]
    return Scheduler(jobs, lanes, executor or LocalExecutor(), poll_s=0.02, **kw).run(tick=tick)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    executor = None
    if "slurm" in spec:  # a driver on the test SLURM cluster: spec["slurm"] holds SlurmExecutor's arguments
        from vltune.runner.slurm_executor import SlurmExecutor

        executor = SlurmExecutor(**spec["slurm"])
    result = run_spec(spec, executor=executor, grace_s=5.0)
    print(json.dumps(dict(result.counts), sort_keys=True), flush=True)
    if executor is not None:
        print(json.dumps({"submitted": executor.submitted, "attached": executor.attached}), flush=True)
    sys.exit(130 if result.interrupted else 0)
