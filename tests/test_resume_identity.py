"""A finished suite stays finished when vltune grows: a new trainer, a new key at its default, the weights file moved,
the output folder copied into a fresh checkout. Changing a key a job reads marks exactly that task's jobs stale, names
the key old → new, and the other tasks still run; ``--rerun-stale`` reruns exactly those jobs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import REPO
from yacs.config import CfgNode as CN

import parallel_runner
from vltune.config import identity as identity_module
from vltune.engine import TrainerX
from vltune.registry import TRAINERS
from vltune.results.record import find_records

SUITE = """
base = dict(data=dict(root={root!r}), model=dict(backbone="vltune-tiny", weights={weights!r}),
            output=dict(root={out!r}))
zs = dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=["digits"], eval_only=True)
coop = dict(trainer="CoOp", config="mini", protocol="b2n", datasets=["digits"], seeds=[1, 2], shots=2,
            opts=["OPTIM.MAX_EPOCH", "1"{coop_opts}])
kg = dict(trainer="KgCoOp", config="mini", protocol="fewshot", datasets=["digits"], shots=[1],
          opts=["OPTIM.MAX_EPOCH", "1"])
pipeline = [dict(gpu_ids=[], tasks=["zs", "coop", "kg"])]
"""
N_JOBS = 2 + 4 + 1


def _write(folder, root: str, weights: str, out: str, coop_opts: str = "") -> str:
    path = os.path.join(folder, "configs.py")
    with open(path, "w") as f:
        f.write(SUITE.format(root=root, weights=weights, out=out, coop_opts=coop_opts))
    return path


def _run(config: str, *flags: str) -> int:
    return parallel_runner.main(["--config", config, "--plain", "--debug", "--no-mail", *flags])


def _stamps(out: str) -> dict[str, str]:
    return {r.path: r.created_at + str(r.runner.get("started_at")) for r in find_records(out)}


# A real parallel_runner.py suite, rerun by most tests: every test that reads it is marked slow.
@pytest.fixture(scope="module")
def suite(tmp_path_factory, digits_root, tiny_clip_weights):
    folder = tmp_path_factory.mktemp("suite")
    cache = tmp_path_factory.mktemp("digest-cache")
    os.environ["VLTUNE_CACHE_DIR"] = str(cache)
    out = str(folder / "output")
    config = _write(folder, digits_root, tiny_clip_weights, out)
    assert _run(config) == 0
    records = find_records(out)
    assert len(records) == N_JOBS and all(r.status == "success" for r in records)
    yield folder, config, out, digits_root, tiny_clip_weights
    os.environ.pop("VLTUNE_CACHE_DIR", None)


def _assert_all_done(config: str, out: str, capsys) -> None:
    before = _stamps(out)
    assert _run(config) == 0
    printed = capsys.readouterr().out
    assert f"resuming: {N_JOBS} of {N_JOBS} jobs" in printed, printed[-2000:]
    assert _stamps(out) == before  # nothing ran again


@pytest.mark.slow
def test_a_new_trainer_leaves_every_finished_job_done(suite, capsys):
    _, config, out, _, _ = suite

    def add_config(cfg: CN) -> None:
        cfg.TRAINER.TOY = CN()
        cfg.TRAINER.TOY.ALPHA = 1.0

    TRAINERS.register("ToyMethod", type("ToyMethod", (TrainerX,), {}), add_config=add_config)
    try:
        _assert_all_done(config, out, capsys)
    finally:
        TRAINERS.unregister("ToyMethod")


@pytest.mark.slow
def test_a_new_key_at_its_default_in_a_trainers_node_leaves_every_job_done(suite, capsys):
    _, config, out, _, _ = suite
    add_config = TRAINERS.meta("CoOp")["add_config"]

    def with_new_key(cfg: CN) -> None:
        add_config(cfg)
        cfg.TRAINER.COOP.NEW_KNOB = "off"

    TRAINERS.meta("CoOp")["add_config"] = with_new_key
    identity_module._defaults_of.cache_clear()
    try:
        _assert_all_done(config, out, capsys)
    finally:
        TRAINERS.meta("CoOp")["add_config"] = add_config
        identity_module._defaults_of.cache_clear()


@pytest.mark.slow
def test_moving_the_weights_file_leaves_every_job_done(suite, tmp_path, capsys):
    folder, _, out, root, weights = suite
    moved = tmp_path / "moved" / "clip.pt"
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    _assert_all_done(_write(tmp_path, root, str(moved), out), out, capsys)


@pytest.mark.slow
def test_a_copied_output_folder_in_a_fresh_checkout_is_done(suite, tmp_path, monkeypatch, capsys):
    _, _, out, root, weights = suite
    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "fresh-cache"))  # a fresh machine: no digest cached
    monkeypatch.setattr(identity_module, "_MEMO", {})
    copy = str(tmp_path / "clone" / "output")
    shutil.copytree(out, copy)
    _assert_all_done(_write(tmp_path / "clone", root, weights, copy), copy, capsys)


@pytest.mark.slow
def test_changing_a_key_marks_exactly_that_tasks_jobs_stale_and_the_rest_runs(suite, tmp_path, capsys):
    _, _, out, root, weights = suite
    copy = str(tmp_path / "output")
    shutil.copytree(out, copy)
    kg_folder = next(r.folder for r in find_records(copy) if r.job.task == "kg")
    shutil.rmtree(kg_folder)  # the kg task has a job to run
    config = _write(tmp_path, root, weights, copy, coop_opts=', "OPTIM.LR", "0.05"')
    before = _stamps(copy)
    assert _run(config) == 1  # stale jobs are not successes of this run
    err = capsys.readouterr().err
    assert "task 'coop': 4 job folders hold a finished run of a different config: OPTIM.LR 0.01 → 0.05" in err
    assert "'zs'" not in err and "'kg'" not in err
    after = {r.path: r for r in find_records(copy)}
    assert os.path.join(kg_folder, "result.json") in after  # the kg task ran
    assert after[os.path.join(kg_folder, "result.json")].status == "success"
    coop = [p for p, r in after.items() if r.job.task == "coop"]
    assert len(coop) == 4 and all(_stamps(copy)[p] == before[p] for p in coop)  # kept, not rerun

    assert _run(config, "--rerun-stale") == 0
    rerun = {r.path: r for r in find_records(copy)}
    assert all(rerun[p].created_at and _stamps(copy)[p] != before[p] for p in coop)
    assert all(rerun[p].config["OPTIM"]["LR"] == 0.05 for p in coop)
    untouched = [p for p in before if p not in coop]
    assert all(_stamps(copy)[p] == before[p] for p in untouched)
    job = json.loads(open(os.path.join(os.path.dirname(coop[0]), "job.json")).read())
    assert job["identity"]["OPTIM.LR"] == 0.05


def test_a_weights_file_made_after_expansion_is_identified_by_content_before_jobs_run(tmp_path, digits_root,
                                                                                        tiny_clip_weights):
    from vltune.runner.jobs import expand, refresh_identities
    from vltune.runner.schema import load_experiments

    later = tmp_path / "weights" / "made-later.pt"  # MiniBench pretrains its CLIP after the jobs are expanded
    config = _write(tmp_path, digits_root, str(later), str(tmp_path / "out"))
    jobs = expand(load_experiments(config, str(REPO)), str(REPO), check_files=False)
    assert all(j.identity["weights"] == f"missing:{later}" for j in jobs)
    later.parent.mkdir()
    shutil.copy(tiny_clip_weights, later)
    refresh_identities(jobs)
    digest = identity_module.file_digest(str(later))
    assert all(j.identity["weights"] == f"sha256:{digest}" for j in jobs)
