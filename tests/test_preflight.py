"""Mistakes found before anything runs: configs.py value types, config value ranges and names (train.py and the
runner), yaml syntax errors, and the runner's pre-flight (weights file, dataset folder) listing every problem at once,
also under ``--dry-run``."""

from __future__ import annotations

import os
import textwrap

import pytest
from conftest import REPO

import parallel_runner
import train
from vltune.config import ConfigError, get_cfg
from vltune.config.validate import trainer_trains, validate_cfg
from vltune.runner.jobs import expand
from vltune.runner.schema import SuiteError, Task, load_experiments

COOP_YAML = str(REPO / "configs" / "trainers" / "CoOp" / "tiny_ep10.yaml")
ZS_YAML = str(REPO / "configs" / "trainers" / "ZeroshotCLIP" / "tiny.yaml")
DIGITS_YAML = str(REPO / "configs" / "datasets" / "digits.yaml")


def _task(**kw) -> Task:
    return Task.from_dict("coop", {"trainer": "CoOp", "config": "tiny_ep10", "protocol": "b2n", "datasets": ["digits"],
                                   **kw}, str(REPO))


def _suite(tmp_path, root: str, weights: str, body: str, extra_base: str = "") -> str:
    path = tmp_path / "configs.py"
    path.write_text(textwrap.dedent(f"""
        base = dict(data=dict(root={root!r}), model=dict(backbone="vltune-tiny", weights={weights!r}),
                    output=dict(root="out"){extra_base})
    """) + textwrap.dedent(body))
    return str(path)


# ---------------------------------------------------------------- configs.py types
@pytest.mark.parametrize("task, message", [
    (dict(eval_only="False"), r"task 'coop': 'eval_only' = 'False' \(str\) \(did you mean False\?\); expected a bool"),
    (dict(eval_only=1), r"'eval_only' = 1 \(int\) \(did you mean True\?\); expected a bool"),
    (dict(seeds="1,2"), r"'seeds' = '1,2' \(str\) \(did you mean \[1, 2\]\?\); expected an integer or a list"),
    (dict(seeds=[1, True]), r"'seeds' = \[1, True\] \(list\); expected an integer or a list of integers"),
    (dict(shots="16"), r"'shots' = '16' \(str\) \(did you mean 16\?\); expected an integer"),
    (dict(datasets=["digits", 3]), r"'datasets' = \['digits', 3\] \(list\); expected a string or a list of strings"),
    (dict(trainer=["CoOp"]), r"'trainer' = \['CoOp'\] \(list\); expected a string"),
    (dict(opts="OPTIM.LR 0.1"), r"'opts' = 'OPTIM.LR 0.1' \(str\); expected a list of KEY VALUE items"),
    (dict(grid=[("OPTIM.LR", [0.1])]), r"'grid' = .* \(list\); expected a dict"),
    (dict(grid=dict(params=["OPTIM.LR"])), r"grid: 'params' = \['OPTIM.LR'\] \(list\); expected a dict"),
])
def test_a_configs_py_value_of_the_wrong_type_is_named_with_the_expected_type(task, message):
    with pytest.raises(SuiteError, match=message):
        _task(**task)


def test_wrong_types_in_base_and_pipeline_are_named(tmp_path):
    ok = 'coop = dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"])\n'
    cases = [
        (", slots_per_gpu='2'", "pipeline = [dict(tasks=['coop'])]", r"base: 'slots_per_gpu' = '2' \(str\)"),
        ("", "pipeline = [dict(gpu_ids='0', tasks=['coop'])]", r"pipeline\[0\]: 'gpu_ids' = '0' \(str\) \(did you"),
        (", executor=dict(max_retries='3')", "pipeline = [dict(tasks=['coop'])]",
         r"base\['executor'\]: 'max_retries' = '3' \(str\) \(did you mean 3\?\); expected an integer"),
    ]
    for extra_base, pipeline, message in cases:
        with pytest.raises(SuiteError, match=message):
            load_experiments(_suite(tmp_path, "data", "w.pt", ok + pipeline, extra_base), str(REPO))


def test_the_right_types_still_load():
    task = _task(seeds=[1, 2], shots=4, eval_only=False, opts=["OPTIM.MAX_EPOCH", 2], datasets="digits")
    assert task.seeds == [1, 2] and task.shots == [4] and task.opts == ["OPTIM.MAX_EPOCH", "2"]


# ---------------------------------------------------------------- config values
def _cfg(*opts: str, yaml: str = COOP_YAML, trainer: str = "CoOp"):
    return get_cfg(dataset_config_file=DIGITS_YAML, config_file=yaml, opts=["TRAINER.NAME", trainer, *opts])


@pytest.mark.parametrize("opts, message", [
    (["OPTIM.LR", "-0.1"], r"OPTIM.LR = -0.1; it must be > 0"),
    (["OPTIM.LR", "0.0"], r"OPTIM.LR = 0.0; it must be > 0"),
    (["DATALOADER.TRAIN_X.BATCH_SIZE", "0"], r"DATALOADER.TRAIN_X.BATCH_SIZE = 0; it must be >= 1"),
    (["DATALOADER.TEST.BATCH_SIZE", "0"], r"DATALOADER.TEST.BATCH_SIZE = 0; it must be >= 1"),
    (["OPTIM.WEIGHT_DECAY", "-1.0"], r"OPTIM.WEIGHT_DECAY = -1.0; it must be >= 0"),
    (["OPTIM.NAME", "sgdd"], r"OPTIM.NAME = 'sgdd' \(did you mean sgd.*\); choose one of sgd, adam, adamw"),
    (["OPTIM.LR_SCHEDULER", "cosin"], r"OPTIM.LR_SCHEDULER = 'cosin' \(did you mean cosine\?\); choose one of"),
    (["OPTIM.WARMUP_EPOCH", "1", "OPTIM.WARMUP_TYPE", "step"], r"OPTIM.WARMUP_TYPE = 'step'; choose one of"),
    (["OPTIM.MAX_EPOCH", "0"], r"OPTIM.MAX_EPOCH = 0; it must be >= 1; a trained method needs at least 1 epoch"),
])
def test_a_value_out_of_range_or_an_unknown_name_is_a_config_error(opts, message):
    cfg = _cfg(*opts)
    with pytest.raises(ConfigError, match=message):
        validate_cfg(cfg, trainer_trains("CoOp"))


def test_max_epoch_0_is_allowed_for_zero_shot_trainers_and_evaluations_only():
    assert not trainer_trains("ZeroshotCLIP") and not trainer_trains("ZeroshotCLIP2") and trainer_trains("CoOp")
    assert not trainer_trains("CoOp", eval_only=True)
    validate_cfg(_cfg("OPTIM.MAX_EPOCH", "0", yaml=ZS_YAML, trainer="ZeroshotCLIP"), trainer_trains("ZeroshotCLIP"))
    validate_cfg(_cfg("OPTIM.MAX_EPOCH", "0"), trainer_trains("CoOp", eval_only=True))
    validate_cfg(_cfg(), trainer_trains("CoOp"))  # the shipped config itself is valid


def _train_argv(tmp_path, *opts: str, config: str = COOP_YAML, trainer: str = "CoOp") -> list[str]:
    return ["--root", str(tmp_path / "data"), "--seed", "1", "--trainer", trainer, "--dataset-config-file",
            DIGITS_YAML, "--config-file", config, "--output-dir", str(tmp_path / "run"), *opts]


@pytest.mark.parametrize("opts, message", [
    (["OPTIM.MAX_EPOCH", "0"], "error: OPTIM.MAX_EPOCH = 0"),
    (["OPTIM.LR", "-1.0"], "error: OPTIM.LR = -1.0"),
    (["OPTIM.NAME", "lion"], "error: OPTIM.NAME = 'lion'"),
])
def test_train_py_refuses_bad_values_with_exit_2_before_any_work(tmp_path, capsys, opts, message):
    assert train.main(_train_argv(tmp_path, *opts)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no record, no log: nothing ran


def test_a_yaml_syntax_error_names_the_file_and_line_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("OPTIM:\n  NAME: \"sgd\"\n  LR: [0.1\nTRAINER:\n  NAME: CoOp\n")
    assert train.main(_train_argv(tmp_path, config=str(bad))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: invalid yaml at line 4, column ") and "Traceback" not in err


# ---------------------------------------------------------------- runner pre-flight
TWO_TASKS = """
coop = dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"], seeds=[1, 2])
zs = dict(trainer="ZeroshotCLIP", config="tiny", protocol="fewshot", datasets=["digits"], eval_only=True,
          opts=["OPTIM.MAX_EPOCH", "0"])
pipeline = [dict(gpu_ids=[], tasks=["coop", "zs"])]
"""


def test_preflight_lists_a_missing_weights_file_and_a_missing_dataset_folder_in_one_error(tmp_path):
    exp = load_experiments(_suite(tmp_path, "nodata", "missing.pt", TWO_TASKS), str(REPO))
    with pytest.raises(SuiteError) as info:
        expand(exp, str(REPO))
    text = str(info.value)
    assert text.startswith("pre-flight found 4 problem(s); nothing was run")
    weights, data = str(tmp_path / "missing.pt"), str(tmp_path / "nodata" / "digits")
    for task in ("coop", "zs"):
        assert f"task {task!r}, job {task} " in text
    assert f"MODEL.BACKBONE.WEIGHTS {weights!r}: no weights file" in text
    assert f"folder {data} not found; expected under the root: digits/  images/, split_zhou_Digits.json" in text
    assert "(and 3 more job(s) of this task)" in text  # coop: 2 seeds x (train, eval) share one weights problem
    assert not (tmp_path / "out").exists()


def test_preflight_checks_the_split_file_of_an_existing_dataset_folder(tmp_path, tiny_clip_weights):
    (tmp_path / "data" / "digits" / "images").mkdir(parents=True)
    exp = load_experiments(_suite(tmp_path, "data", tiny_clip_weights, TWO_TASKS), str(REPO))
    with pytest.raises(SuiteError, match=r"split file .*split_zhou_Digits.json not found"):
        expand(exp, str(REPO))


def test_preflight_collects_config_errors_of_every_task(tmp_path, digits_root, tiny_clip_weights):
    body = TWO_TASKS.replace('seeds=[1, 2])', 'seeds=[1, 2], opts=["OPTIM.MAX_EPOCH", "0", "OPTIM.NAME", "sgd"])')
    exp = load_experiments(_suite(tmp_path, digits_root, tiny_clip_weights, body), str(REPO))
    with pytest.raises(SuiteError) as info:
        expand(exp, str(REPO))
    text = str(info.value)
    assert "pre-flight found 1 problem(s)" in text  # the zero-shot task with MAX_EPOCH 0 passes
    first = "task 'coop', job coop base digits seed1 16shot (and 1 more job(s) of this task)"
    assert f"{first}: OPTIM.MAX_EPOCH = 0" in text
    assert "task 'zs'" not in text


def test_preflight_passes_with_real_files_and_skips_file_checks_for_minibench(tmp_path, digits_root,
                                                                              tiny_clip_weights):
    exp = load_experiments(_suite(tmp_path, digits_root, tiny_clip_weights, TWO_TASKS), str(REPO))
    jobs = expand(exp, str(REPO))
    assert len(jobs) == 5 and all(j.identity_hash for j in jobs)
    minibench = load_experiments(_suite(tmp_path, "nodata", "missing.pt", TWO_TASKS, ", prepare='minibench'"),
                                 str(REPO))
    assert len(expand(minibench, str(REPO))) == 5  # MiniBench makes its data and weights after expansion
    assert len(expand(load_experiments(_suite(tmp_path, "nodata", "missing.pt", TWO_TASKS), str(REPO)), str(REPO),
                      check_files=False)) == 5


def test_dry_run_fails_with_exit_2_on_preflight_problems_and_writes_nothing(tmp_path, capsys):
    path = _suite(tmp_path, "nodata", "missing.pt", TWO_TASKS)
    assert parallel_runner.main(["--config", path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pre-flight found 4 problem(s)")
    assert "MODEL.BACKBONE.WEIGHTS" in err and "nodata" in err
    assert not os.path.exists(tmp_path / "out")
