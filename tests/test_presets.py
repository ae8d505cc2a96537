"""Paper presets and their scripts: every registered method's registration gives each protocol a preset config or a
reason; the configs' yaml files exist and merge;
each benchmark expands to the documented job counts; each script runs end to end on a miniature data root holding
all 15 datasets' layouts with a tiny CLIP, and writes tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import REPO

from vltune.config import get_cfg
from vltune.registry import PRESET_PROTOCOLS, TRAINERS, RegistryError, TrainerRegistry
from vltune.runner import presets
from vltune.runner.jobs import expand_task
from vltune.runner.presets import BENCHMARK_DATASETS, DG_TARGETS, XD_SOURCE, XD_TARGETS, experiment
from vltune.runner.schema import Base, Task

get_cfg()
PRESETS = {"base2new": "b2n", "few_shot": "fewshot", "cross_dataset": "xd", "domain_generalization": "dg",
           "ablation_skiptuning": "ablation"}
#: jobs per method and benchmark (3 seeds), as the README documents them
PER_METHOD = {"b2n": 11 * 3 * 2, "fewshot": 11 * 5 * 3, "xd": 3 + 10 * 3, "dg": 3 + 4 * 3}
EVAL_ONLY_FEWSHOT = 11 * 3  # zero-shot has no shots: one evaluation per dataset and seed
ABLATION = (5 + 6 + 7) * 11 * 3 * 2  # start layers, top ratios, lambdas; base-to-new train + new-class test


def _jobs(protocol: str, env: dict[str, str] | None = None) -> dict[str, list]:
    names = experiment(protocol, env or {})
    base = Base.from_dict(names["base"], str(REPO / "presets"), str(REPO))
    tasks = {k: Task.from_dict(k, v, str(REPO)) for k, v in names.items() if isinstance(v, dict) and "trainer" in v}
    return {k: expand_task(t, base, str(REPO)) for k, t in tasks.items()}


def test_every_registered_method_gives_each_protocol_a_config_or_a_reason():
    for name in TRAINERS.registered_names():
        meta = TRAINERS.meta(name)
        given, why = meta.get("presets") or {}, meta.get("no_preset") or {}
        for protocol in PRESET_PROTOCOLS:
            assert (protocol in given) != (protocol in why), f"{name}: give presets[{protocol!r}] or a reason"
            assert protocol in given or len(why[protocol]) > 20, f"{name}: say why there is no {protocol} preset"
    assert set(presets.methods()) == set(TRAINERS.registered_names())
    assert presets.METHODS == presets.methods()  # the names presets/*.py and older code read
    assert presets.EVAL_ONLY == presets.eval_only_methods() == {"ZeroshotCLIP", "ZeroshotCLIP2"}
    assert list(presets.methods())[:2] == ["ZeroshotCLIP", "ZeroshotCLIP2"]  # the zero-shot baselines first


def test_registration_rejects_a_malformed_preset_entry():
    class T:
        pass

    bad = {"dg": dict(presets=dict(dg="x")), "both": dict(presets=dict(xd="x"), no_preset=dict(xd="why")),
           "empty reason": dict(no_preset=dict(fewshot=" ")), "shots": dict(presets=dict(fewshot={"1": "x"})),
           "flag": dict(eval_only="yes")}
    messages = {"dg": "unknown protocol.*dg uses xd's entry", "both": "both presets and no_preset",
                "empty reason": "must say why", "shots": "positive int shots", "flag": "eval_only must be True"}
    for case, meta in bad.items():
        with pytest.raises(RegistryError, match=messages[case]):
            TrainerRegistry("trainer").register("T", T, **meta)
    ok = TrainerRegistry("trainer")
    ok.register("T", T, presets=dict(b2n="a", fewshot={1: "b", 16: "c"}), no_preset=dict(xd="a reason"))


@pytest.mark.parametrize("protocol", ["b2n", "fewshot", "xd", "dg"])
def test_each_benchmark_expands_to_the_documented_job_counts(protocol, capsys):
    jobs = _jobs(protocol)
    printed = capsys.readouterr().err
    per_method = Counter()
    for tasks_jobs in jobs.values():
        for job in tasks_jobs:
            per_method[job.trainer] += 1
    for method, count in per_method.items():
        expected = EVAL_ONLY_FEWSHOT if protocol == "fewshot" and method in presets.eval_only_methods() else \
            PER_METHOD[protocol]
        assert count == expected, (protocol, method)
    entry = "xd" if protocol == "dg" else protocol
    left_out = {m for m in presets.methods() if m not in per_method}
    documented = {m for m, why in presets.reasons().items() if entry in why}
    assert left_out == documented
    for method in left_out:  # the preset says why it leaves a method out
        assert f"preset {protocol}: {method} left out" in printed and presets.reasons()[method][entry] in printed
    if protocol in ("xd", "dg"):
        datasets = {j.dataset for js in jobs.values() for j in js}
        assert datasets == {XD_SOURCE, *(XD_TARGETS if protocol == "xd" else DG_TARGETS)}


def test_the_ablation_expands_three_grid_searches():
    jobs = _jobs("ablation")
    assert sorted(jobs) == ["skiptuning_ablation_lambda", "skiptuning_ablation_start_layer",
                            "skiptuning_ablation_top_ratio"]
    assert sum(len(js) for js in jobs.values()) == ABLATION
    assert {j.grid_name for j in jobs["skiptuning_ablation_start_layer"]} == {
        f"START_LAYER={n}" for n in (2, 4, 6, 8, 10)}


def test_few_shot_uses_the_per_k_configs_where_the_paper_does():
    jobs = _jobs("fewshot", {"VLTUNE_METHODS": "CoOp"})
    by_config = {task: sorted({j.shots for j in js}) for task, js in jobs.items()}
    assert by_config == {"coop_fewshot_vit_b16_ep50": [1], "coop_fewshot_vit_b16_ep100": [2, 4],
                         "coop_fewshot_vit_b16": [8, 16]}


def test_every_referenced_yaml_exists_and_merges_for_every_method():
    checked = set()
    for protocol in ("b2n", "fewshot", "xd", "dg"):
        for task in (v for k, v in experiment(protocol, {}).items() if isinstance(v, dict) and "trainer" in v):
            key = (task["trainer"], task["config"])
            if key in checked:
                continue
            checked.add(key)
            config = task["config"]
            path = config if os.path.isabs(config) else REPO / "configs" / "trainers" / task["trainer"] / \
                f"{config}.yaml"
            assert os.path.isfile(path), path
            get_cfg(config_file=str(path), opts=["TRAINER.NAME", task["trainer"], "DATASET.NAME", "ImageNet"])
    for name in {*BENCHMARK_DATASETS, *DG_TARGETS}:
        get_cfg(dataset_config_file=str(REPO / "configs" / "datasets" / f"{name}.yaml"))
    assert len(checked) >= len(presets.methods())


def test_unknown_method_and_bad_numbers_fail_clearly():
    with pytest.raises(ValueError, match=r"VLTUNE_METHODS \(--methods\): unknown method 'CoOP' \(did you mean CoOp"):
        experiment("b2n", {"VLTUNE_METHODS": "CoOP"})
    with pytest.raises(ValueError, match="VLTUNE_SEEDS takes numbers"):
        experiment("b2n", {"VLTUNE_SEEDS": "one"})


# ------------------------------------------------------------------------------------------------ the scripts
# The presets' precision stays: on --gpus cpu their fp16 configs run in amp (the note line says which).
TINY_OPTS = ("INPUT.SIZE (32,32) OPTIM.MAX_EPOCH 1 OPTIM.WARMUP_EPOCH 0 DATALOADER.NUM_WORKERS 0 "
             "DATALOADER.TRAIN_X.BATCH_SIZE 4 DATALOADER.TEST.BATCH_SIZE 32")
NOTE = "--gpus cpu: fp16 configs run in amp (bf16 autocast) on the CPU"


def _run(script: str, root, weights: str, out, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "VLTUNE_CACHE_DIR": str(out / "cache")}
    argv = ["bash", str(REPO / "scripts" / f"{script}.sh"), "--data", str(root), "--weights", weights,
            "--backbone", "vltune-tiny", "--gpus", "cpu", "--slots", "2", "--seeds", "1", "--output", str(out / "run"),
            *args, "--", "--plain", "--no-mail"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(out))


def _successes(out) -> int:
    n = 0
    for folder, _, files in os.walk(out / "run"):
        if "result.json" in files:
            with open(os.path.join(folder, "result.json")) as f:
                n += json.load(f)["status"] == "success"
    return n


# Few datasets per script keep CI short; every dataset's loading is covered by test_datasets.py on the same layouts.
@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "jobs", "amp"), [
    ("base2new", ["--methods", "CoOp", "--datasets", "imagenet sun397", "--opts", TINY_OPTS], 4, "CoOp"),
    ("few_shot", ["--methods", "ZeroshotCLIP CoOp", "--shots", "1", "--datasets", "stanford_cars", "--opts",
                  TINY_OPTS], 2, "ZeroshotCLIP, CoOp"),
    ("cross_dataset", ["--methods", "CoOp", "--datasets", "fgvc_aircraft eurosat", "--opts", TINY_OPTS], 3, "CoOp"),
    ("domain_generalization", ["--methods", "ZeroshotCLIP", "--opts", TINY_OPTS], 5, "ZeroshotCLIP"),
    ("ablation_skiptuning", ["--datasets", "dtd", "--start-layers", "1 2", "--top-ratios", "0.5", "--lambdas", "0.3",
                             "--opts", TINY_OPTS + " TRAINER.SKIP.START_LAYER 1 TRAINER.FINETUNE.PREC fp32"], 8, ""),
])
def test_script_runs_on_a_miniature_root_and_writes_tables(script, args, jobs, amp, coop_layout_root,
                                                            random_clip_weights, tmp_path):
    run = _run(script, coop_layout_root, random_clip_weights, tmp_path, *args)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert _successes(tmp_path) == jobs
    notes = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(NOTE)]
    assert notes == ([f"{NOTE}: {amp}"] if amp else [])  # once for the suite, not once per job
    tables = {p.name for p in (tmp_path / "run" / "tables").glob("*.csv")}
    assert "compare_cost.csv" in tables and len(tables) > 1, tables
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# Results\n\n## Comparison") and "cost per method and protocol" in report


def test_script_help_and_bad_options():
    for script in PRESETS:
        run = subprocess.run(["bash", str(REPO / "scripts" / f"{script}.sh"), "--help"], capture_output=True,
                             text=True)
        assert run.returncode == 0 and f"usage: scripts/{script}.sh" in run.stdout and "--data DIR" in run.stdout
        assert "--smoke " in run.stdout and "[VLTUNE_SMOKE=1]" in run.stdout
    run = subprocess.run(["bash", str(REPO / "scripts" / "base2new.sh"), "--gpu", "0"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "unknown option --gpu" in run.stderr
    run = subprocess.run(["bash", str(REPO / "scripts" / "base2new.sh"), "--data"], capture_output=True, text=True)
    assert run.returncode == 2 and "--data needs a value" in run.stderr
