"""``parallel_runner.py`` end to end on MiniBench with real ``train.py`` subprocesses: b2n, few-shot, cross-dataset and
domain-generalisation tables equal the numbers computed here by hand from the records, the summary mail reaches a
real SMTP server on loopback with the tables and plots, and a dead mail server does not fail the run."""

from __future__ import annotations

import csv
import email
import email.policy
import os
from statistics import mean, pstdev

import pytest
from aiosmtpd.controller import Controller
from test_mail import Recorder, free_port

import parallel_runner
from vltune.results.record import find_records
from vltune.results.tables import harmonic_mean

SUITE = """
base = dict(data=dict(root={root!r}), model=dict(backbone="vltune-tiny", weights={weights!r}),
            output=dict(root="output"), slots_per_gpu=2,
            mail=dict(enabled=True, host="127.0.0.1", port={port}, security="none", sender="vltune@localhost",
                      to=["me@localhost"], timeout_s=5))
FAST = ["OPTIM.MAX_EPOCH", "2"]
zs_b2n = dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=["digits", "mini_shapes"],
              eval_only=True)
coop_b2n = dict(trainer="CoOp", config="mini", protocol="b2n", datasets=["digits", "mini_shapes"], seeds=[1, 2],
                shots=4, opts=FAST)
coop_fewshot = dict(trainer="CoOp", config="mini", protocol="fewshot", datasets=["digits"], shots=[1, 2], opts=FAST)
coop_xd = dict(trainer="CoOp", config="mini", protocol="xd", source="mini_union", datasets=["digits", "mini_shapes"],
               variants=["mini_union_sketch", "mini_union_v2"], shots=2, opts=FAST)
pipeline = [dict(gpu_ids=[], tasks=["zs_b2n", "coop_b2n"]), dict(gpu_ids=[], tasks=["coop_fewshot", "coop_xd"])]
"""
N_JOBS = 4 + 8 + 2 + 5
pytestmark = pytest.mark.slow  # every test reads one parallel_runner.py run of 19 train.py jobs


@pytest.fixture(scope="module")
def run(minibench, tmp_path_factory):
    root, weights = minibench
    folder = tmp_path_factory.mktemp("runner")
    handler = Recorder()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), ready_timeout=5)
    controller.start()
    try:
        (folder / "configs.py").write_text(SUITE.format(root=root, weights=weights, port=controller.port))
        code = parallel_runner.main(["--config", str(folder / "configs.py"), "--plain"])
    finally:
        controller.stop()
    return code, str(folder / "output"), handler.received, folder


def _table(out: str, name: str) -> list[dict[str, str]]:
    with open(os.path.join(out, "tables", f"{name}.csv")) as f:
        return list(csv.DictReader(f))


def _acc(records, task: str, **match) -> dict:
    return {(r.job.dataset, r.job.seed, r.job.role, r.job.shots): r.metrics["accuracy"] for r in records
            if r.job.task == task and all(getattr(r.job, k) == v for k, v in match.items())}


def test_every_job_ran_in_its_own_process_and_succeeded(run):
    code, out, _, _ = run
    rows = find_records(out)
    assert code == 0 and len(rows) == N_JOBS
    assert all(r.status == "success" and r.runner["exit_code"] == 0 for r in rows)
    for r in rows:
        assert os.path.exists(os.path.join(r.folder, "stdout.log")) and os.path.exists(os.path.join(r.folder,
                                                                                                 "config.yaml"))
    assert "Finish training" in open(os.path.join(rows[4].folder, "log.txt")).read()  # coop_b2n's first train job


def test_b2n_table_equals_the_hand_computed_numbers(run):
    _, out, _, _ = run
    acc = _acc(find_records(out), "coop_b2n")
    table = {r["dataset"].strip("*"): r for r in _table(out, "coop_b2n.b2n")}
    base_means, new_means = {}, {}
    for d in ("Digits", "MiniShapes"):  # records and tables name datasets by their registry names
        base = [acc[d, s, "base", 4] for s in (1, 2)]
        new = [acc[d, s, "new", 4] for s in (1, 2)]
        base_means[d], new_means[d] = mean(base), mean(new)
        assert float(table[d]["base mean"]) == pytest.approx(mean(base))
        assert float(table[d]["base std"]) == pytest.approx(pstdev(base))
        assert float(table[d]["new mean"]) == pytest.approx(mean(new))
        assert float(table[d]["H mean"]) == pytest.approx(harmonic_mean(mean(base), mean(new)))
    b, n = mean(base_means.values()), mean(new_means.values())
    assert float(table["average"]["H mean"]) == pytest.approx(2 * b * n / (b + n))


def test_fewshot_xd_and_dg_tables_equal_the_hand_computed_numbers(run):
    _, out, _, _ = run
    rows = find_records(out)
    few = _acc(rows, "coop_fewshot")
    table = {r["dataset"].strip("*"): r for r in _table(out, "coop_fewshot.fewshot")}
    for k in (1, 2):
        column = next(c for c in table["Digits"] if c.startswith(f"{k}-shot") and "std" not in c)
        assert float(table["Digits"][column]) == pytest.approx(few["Digits", 1, "fewshot", k])
    xd = {(r.job.role, r.job.dataset): r.metrics["accuracy"] for r in rows if r.job.task == "coop_xd"}
    xd_row = next(r for r in _table(out, "coop_xd.xd") if "mean" in next(iter(r.values())))
    assert float(xd_row["MiniUnion"]) == pytest.approx(xd["source", "MiniUnion"])
    assert float(xd_row["average_xd"]) == pytest.approx(mean([xd["target", "Digits"], xd["target", "MiniShapes"]]))
    dg_row = next(r for r in _table(out, "coop_xd.dg") if "mean" in next(iter(r.values())))
    assert float(dg_row["average_dg"]) == pytest.approx(
        mean([xd["variant", "MiniUnionSketch"], xd["variant", "MiniUnionV2"]]))
    report = open(os.path.join(out, "report.md")).read()
    for part in ("## Comparison", "coop_b2n", "coop_fewshot", "average_xd", "average_dg", "cost per method",
                 "plots/fewshot.png"):
        assert part in report
    assert os.path.getsize(os.path.join(out, "plots", "efficiency_time.png")) > 1000


def test_a_mail_per_task_and_one_at_the_end_with_tables_and_plots(run):
    _, out, received, _ = run
    messages = [email.message_from_bytes(m["content"], policy=email.policy.default) for m in received]
    subjects = [m["subject"] for m in messages]
    assert len(messages) == 5, subjects  # four tasks, then the suite
    assert sorted(s.split("] ")[1].split(":")[0] for s in subjects[:4]) == sorted(
        ["zs_b2n", "coop_b2n", "coop_fewshot", "coop_xd"])
    final = messages[-1]
    assert final["subject"] == f"[vltune] suite: {N_JOBS} succeeded, 0 failed"
    body = final.get_body(preferencelist=("plain",)).get_content()
    assert "| **average** |" in body and "average_xd" in body and "No failures." in body
    pngs = {p.get_filename(): p.get_content() for p in final.iter_attachments()}
    assert {"fewshot.png", "efficiency_time.png", "efficiency_memory_cpu_profiler_tensor_bytes.png"} <= set(pngs)
    assert os.listdir(os.path.join(out, "plots")) and not any(n.startswith("train_loss_") for n in pngs)  # report only
    assert any(n.startswith("train_loss_") for n in os.listdir(os.path.join(out, "plots")))
    assert all(data.startswith(b"\x89PNG") for data in pngs.values())


def test_rerun_with_the_mail_server_down_skips_every_job_and_still_succeeds(run, capsys):
    _, out, _, folder = run
    before = {r.path: r.created_at for r in find_records(out)}
    assert parallel_runner.main(["--config", str(folder / "configs.py"), "--plain"]) == 0
    assert f"resuming: {N_JOBS} of {N_JOBS} jobs" in capsys.readouterr().out
    assert {r.path: r.created_at for r in find_records(out)} == before  # nothing ran again
    log = open(os.path.join(out, "runner.log")).read()
    assert "127.0.0.1" in log  # the failed delivery is logged, naming the server
