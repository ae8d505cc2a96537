"""configs.py validation (every mistake named before anything runs), task expansion into jobs per protocol and grid,
and the runner's command line (dry run, errors, exit codes)."""

from __future__ import annotations

import textwrap

import pytest
from conftest import REPO

import parallel_runner
from vltune.runner.jobs import expand, expand_task, grid_label
from vltune.runner.schema import Base, Grid, SuiteError, Task, load_experiments

BASE = Base(data_root="/D", output_root="/O", backbone="vltune-tiny", weights="/W.pt")
HEADER = """
base = dict(data=dict(root="data"), model=dict(backbone="vltune-tiny", weights="w.pt"), output=dict(root="out"))
"""


def _task(**kw) -> Task:
    return Task.from_dict(kw.pop("name", "t"), {"trainer": "CoOp", "config": "tiny_ep10", "protocol": "b2n",
                                                 "datasets": ["digits"], **kw}, str(REPO))


def _file(tmp_path, body: str, header: str = HEADER):
    path = tmp_path / "configs.py"
    path.write_text(textwrap.dedent(header) + textwrap.dedent(body))
    return str(path)


def test_b2n_expands_to_a_train_and_a_dependent_eval_job_per_dataset_and_seed():
    jobs = expand_task(_task(seeds=[1, 2], shots=16), BASE, str(REPO))
    assert [(j.role, j.seed) for j in jobs] == [("base", 1), ("new", 1), ("base", 2), ("new", 2)]
    train, new = jobs[0], jobs[1]
    assert "--eval-only" not in train.argv and train.argv[train.argv.index("DATASET.SUBSAMPLE_CLASSES") + 1] == "base"
    assert new.depends_on == train.out and new.argv[new.argv.index("--model-dir") + 1] == train.out
    assert "--eval-only" in new.argv and new.argv[new.argv.index("DATASET.SUBSAMPLE_CLASSES") + 1] == "new"
    assert train.out == "/O/t/train_base/digits/shots16/seed1" and new.out == "/O/t/test_new/digits/shots16/seed1"
    assert train.argv[train.argv.index("MODEL.BACKBONE.WEIGHTS") + 1] == "/W.pt"


def test_fewshot_xd_and_zero_shot_expansion():
    few = expand_task(_task(protocol="fewshot", shots=[1, 2, 4]), BASE, str(REPO))
    assert [j.shots for j in few] == [1, 2, 4] and all(f"shots{j.shots}" in j.out for j in few)
    assert all(j.argv[j.argv.index("DATASET.NUM_SHOTS") + 1] == str(j.shots) for j in few)
    xd = expand_task(_task(protocol="xd", source="digits", datasets=["oxford_pets", "dtd"],
                           variants=["imagenet_a"]), BASE, str(REPO))
    assert [(j.role, j.dataset) for j in xd] == [("source", "digits"), ("target", "oxford_pets"),
                                                 ("target", "dtd"), ("variant", "imagenet_a")]
    assert all(j.depends_on == xd[0].out and "DATASET.NUM_SHOTS" not in j.argv for j in xd[1:])
    zs = expand_task(_task(trainer="ZeroshotCLIP", config="tiny", eval_only=True), BASE, str(REPO))
    assert all("--eval-only" in j.argv and not j.depends_on and j.shots == 0 for j in zs)


def test_grid_search_in_product_and_zip_mode():
    grid = Grid(params={"OPTIM.LR": [0.1, 0.01], "TRAINER.COOP.N_CTX": [4, 8]}, mode="product")
    assert len(grid.points()) == 4
    zipped = Grid(params={"OPTIM.LR": [0.1, 0.01], "TRAINER.COOP.N_CTX": [4, 8]}, mode="zip")
    assert zipped.points() == [{"OPTIM.LR": 0.1, "TRAINER.COOP.N_CTX": 4}, {"OPTIM.LR": 0.01, "TRAINER.COOP.N_CTX": 8}]
    with pytest.raises(SuiteError, match="equal length"):
        Grid(params={"OPTIM.LR": [0.1, 0.01], "TRAINER.COOP.N_CTX": [4]}, mode="zip")
    with pytest.raises(SuiteError, match="product, zip"):
        Grid(params={"OPTIM.LR": [0.1]}, mode="cartesian")
    jobs = expand_task(_task(grid=dict(mode="zip", params={"OPTIM.LR": [0.1, 0.01],
                                                            "TRAINER.COOP.N_CTX": [4, 8]})), BASE, str(REPO))
    assert len(jobs) == 4 and jobs[0].grid_name == "LR=0.1,N_CTX=4"
    assert jobs[0].out == "/O/t/train_base/digits/shots16/LR=0.1,N_CTX=4/seed1"
    assert jobs[1].depends_on == jobs[0].out and jobs[2].grid == {"OPTIM.LR": 0.01, "TRAINER.COOP.N_CTX": 8}
    assert jobs[2].argv[-4:] == ["OPTIM.LR", "0.01", "TRAINER.COOP.N_CTX", "8"]
    shots = expand_task(_task(protocol="fewshot", grid=dict(params={"DATASET.NUM_SHOTS": [1, 4]})), BASE, str(REPO))
    assert [j.shots for j in shots] == [1, 4] and [j.grid_name for j in shots] == ["", ""]
    assert shots[1].out == "/O/t/digits/shots4/seed1"
    assert grid_label({"A.X": 1, "B.X": 2}) == "A.X=1,B.X=2"  # colliding short names fall back to full keys


@pytest.mark.parametrize("task, message", [
    (dict(shot=4), "unknown key 'shot' \\(did you mean shots"),
    (dict(protocol="b2m"), "protocol 'b2m' \\(did you mean b2n"),
    (dict(trainer="Coop"), "did you mean.*CoOp"),
    (dict(config="tiny_ep1"), "trainer config 'tiny_ep1' not found.*did you mean tiny_ep10"),
    (dict(datasets=["digit"]), "unknown dataset 'digit' \\(did you mean digits"),
    (dict(protocol="xd"), "needs 'source'"),
    (dict(protocol="xd", source="digits", datasets=["digits"]), "listed twice"),
    (dict(opts=["OPTIM.LR"]), "KEY VALUE pairs"),
    (dict(grid=dict(parms={})), "unknown key 'parms' \\(did you mean params"),
])
def test_task_mistakes_are_named_with_the_valid_choices(task, message):
    with pytest.raises(SuiteError, match=message):
        _task(**task)


def test_experiment_file_mistakes_fail_on_load(tmp_path):
    ok = 'coop = dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"])\n'
    exp = load_experiments(_file(tmp_path, ok + "pipeline = [dict(gpu_ids=[], tasks=['coop'])]"), str(REPO))
    assert exp.base.output_root == str(tmp_path / "out")  # relative to the experiment file
    assert exp.pipeline[0].slots_per_gpu == 1 and list(exp.tasks) == ["coop"]
    cases = {
        "pipeline = [dict(gpu_ids=[], tasks=['cop'])]": "unknown task 'cop' \\(did you mean coop",
        "pipeline = [dict(gpu_ids=[0], tasks=['coop'])]": "GPU id 0 does not exist; valid GPU ids: none",
        "pipeline = [dict(gpus=[], tasks=['coop'])]": "unknown key 'gpus' \\(did you mean gpu_ids",
        "pipeline = [dict(tasks=['coop']), dict(tasks=['coop'])]": "already in pipeline\\[0\\]",
    }
    for body, message in cases.items():
        with pytest.raises(SuiteError, match=message):
            load_experiments(_file(tmp_path, ok + body), str(REPO))
    bad_base = HEADER.replace("output=dict(", "outpt=dict(")
    with pytest.raises(SuiteError, match="unknown key 'outpt' \\(did you mean output"):
        load_experiments(_file(tmp_path, ok + "pipeline = [dict(tasks=['coop'])]", bad_base), str(REPO))
    secret = HEADER.replace(')\n', ', mail=dict(enabled=True, host="h", to=["a@b"], user="u", password="x"))\n')
    with pytest.raises(SuiteError, match="password_env"):
        load_experiments(_file(tmp_path, ok + "pipeline = [dict(tasks=['coop'])]", secret), str(REPO))
    with pytest.raises(SuiteError, match="--only: unknown task 'zs'"):
        expand(exp, str(REPO), only=["zs"])


def test_a_bad_config_key_in_opts_or_grid_fails_before_anything_runs(tmp_path):
    body = ('coop = dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"], '
            'grid=dict(params={"OPTIM.LRR": [0.1]}))\npipeline = [dict(tasks=["coop"])]\n')
    exp = load_experiments(_file(tmp_path, body), str(REPO))
    with pytest.raises(SuiteError, match="task 'coop'.*OPTIM.LRR.*OPTIM.LR"):
        expand(exp, str(REPO))


def test_dry_run_lists_the_jobs_and_errors_exit_2(tmp_path, capsys, digits_root, tiny_clip_weights):
    body = ('coop = dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"], '
            'seeds=[1, 2, 3])\npipeline = [dict(gpu_ids=[], tasks=["coop"])]\n')
    header = HEADER.replace('"data"', repr(digits_root)).replace('"w.pt"', repr(tiny_clip_weights))
    path = _file(tmp_path, body, header)
    assert parallel_runner.main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 jobs: 6 to run, 0 done" in out and "after #0" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    assert parallel_runner.main(["--config", path, "--dry-run", "--gpus", "7"]) == 2
    assert "GPU id 7 does not exist" in capsys.readouterr().err
    assert parallel_runner.main(["--config", str(tmp_path / "missing.py")]) == 2
    assert "experiment file not found" in capsys.readouterr().err


def test_the_shipped_configs_py_is_valid_and_expands(capsys):
    exp = load_experiments(str(REPO / "configs.py"), str(REPO))
    jobs = expand(exp, str(REPO))
    assert len({j.out for j in jobs}) == len(jobs) and all(j.identity and j.identity_hash for j in jobs)
    assert {j.protocol for j in jobs} == {"b2n", "fewshot", "xd"}
    assert not exp.base.mail.enabled
