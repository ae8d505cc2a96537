"""Fake jobs for the runner tests: ``python -c`` processes that sleep, print, fail or spawn a grandchild, log their
start and end (time, pid, ``CUDA_VISIBLE_DEVICES``) to one JSON-lines file, and write ``result.json`` like
``train.py``. ``python tests/fakejobs.py SPEC.json`` runs a suite of them in a separate runner process."""

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
kid = subprocess.Popen(["sleep", "60"]) if {grandchild!r} else None
log("start", grandchild=kid.pid if kid else None)
print("working on", name)
time.sleep({sleep!r})
if {fail!r}:
    print("boom: job", name, "failed on purpose", file=sys.stderr)
    sys.exit({fail!r})
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(dict(status="success", identity={identity!r}, metrics=dict(accuracy=50.0), cost=dict()), f)
log("end")
if kid:
    kid.kill()
"""


def fake_job(root: str, name: str, events: str, *, sleep: float = 0.0, fail: int = 0, task: str = "t",
             depends_on: str = "", grandchild: bool = False) -> Job:
    out = os.path.join(root, name)
    code = SCRIPT.format(out=out, events=events, name=name, sleep=sleep, fail=fail, identity=IDENTITY,
                         grandchild=grandchild)
    return Job(task=task, out=out, argv=[sys.executable, "-c", code], depends_on=os.path.join(root, depends_on)
               if depends_on else "", role=name, dataset=name, identity=dict(IDENTITY))


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
        result = run_spec(json.load(f), grace_s=5.0)
    print(json.dumps(dict(result.counts), sort_keys=True), flush=True)
    sys.exit(130 if result.interrupted else 0)
