"""The benchmark scripts fit the desk: ``--smoke`` runs each preset's methods and configs on MiniBench stand-ins with
the mini CLIP, offline on the CPU; ``--gpus cpu`` runs fp16 configs in amp and says so once; an unknown name in
``--datasets`` or ``--methods`` fails with did-you-mean before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from vltune.config import get_cfg
from vltune.engine.precision import precision_setting
from vltune.registry import TRAINERS
from vltune.runner import presets, smoke
from vltune.runner.presets import experiment
from vltune.runner.schema import SuiteError

SCRIPTS = {"base2new": "b2n", "few_shot": "fewshot", "cross_dataset": "xd", "domain_generalization": "dg",
           "ablation_skiptuning": "ablation"}
NOTE = "--gpus cpu: fp16 configs run in amp (bf16 autocast) on the CPU"
SMOKE = {"VLTUNE_SMOKE": "1"}


def _tasks(names: dict) -> dict[str, dict]:
    return {k: v for k, v in names.items() if isinstance(v, dict) and "trainer" in v}


def _opts(task: dict) -> dict[str, str]:
    return dict(zip(task["opts"][::2], task["opts"][1::2]))


def _script(script: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    """``scripts/<script>.sh args`` run from ``cwd`` (its cache folder there), ignoring the caller's VLTUNE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLTUNE_")}
    env.update(PYTHON=sys.executable, VLTUNE_CACHE_DIR=os.path.join(cwd, "cache"))
    return subprocess.run(["bash", str(REPO / "scripts" / f"{script}.sh"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd)


# ------------------------------------------------------------------------------------------------- smoke mode
def test_smoke_keeps_the_preset_configs_on_minibench_stand_ins_with_the_mini_clip(tmp_path):
    names = experiment("b2n", {**SMOKE, "VLTUNE_DATA": str(tmp_path)})
    real = _tasks(experiment("b2n", {}))
    tasks = _tasks(names)
    assert {t: v["config"] for t, v in tasks.items()} == {t: v["config"] for t, v in real.items()}
    assert names["base"] == dict(data=dict(root=str(tmp_path)), model=dict(
        backbone="vltune-tiny", weights=str(tmp_path / "minibench-clip.pt")),
        output=dict(root=str(REPO / "output" / "smoke" / "b2n")), prepare="minibench", slots_per_gpu=2)
    assert names["pipeline"] == [dict(gpu_ids=[], tasks=list(tasks))]
    for task in tasks.values():
        assert task["datasets"] == ["mini_shapes"] and task["seeds"] == [1] and task["shots"] == [4]
        opts = _opts(task)
        assert opts["INPUT.SIZE"] == "(32, 32)" and opts["OPTIM.MAX_EPOCH"] == "1"
        assert opts["DATALOADER.NUM_WORKERS"] == "0"
    assert _opts(tasks["maple_b2n"])["TRAINER.MAPLE.PROMPT_DEPTH"] == "2"  # the mini CLIP has 2 blocks
    assert _opts(tasks["skiptuning_b2n"])["TRAINER.SKIP.START_LAYER"] == "1"
    assert _opts(tasks["coop_b2n"])["DATALOADER.TRAIN_X.BATCH_SIZE"] == "4"  # the preset's 32, capped
    assert "DATALOADER.TRAIN_X.BATCH_SIZE" not in _opts(tasks["cocoop_b2n"])  # CoCoOp's batch of 1 stays
    default = smoke.base("b2n", {})
    assert default["data"]["root"] == str(REPO / "data") and default["model"]["weights"] == smoke.DEFAULT_WEIGHTS


def test_smoke_datasets_few_shot_configs_and_ablation_grids():
    assert _tasks(experiment("b2n", {**SMOKE, "VLTUNE_DATASETS": "oxford_pets stanford_cars digits",
                                     "VLTUNE_METHODS": "CoOp"}))["coop_b2n"]["datasets"] == ["mini_objects", "digits"]
    fewshot = _tasks(experiment("fewshot", {**SMOKE, "VLTUNE_METHODS": "CoOp"}))
    assert {t: v["shots"] for t, v in fewshot.items()} == {  # the fewest shots of each of CoOp's configs
        "coop_fewshot_vit_b16_ep50": [1], "coop_fewshot_vit_b16_ep100": [2], "coop_fewshot_vit_b16": [8]}
    xd = _tasks(experiment("xd", {**SMOKE, "VLTUNE_METHODS": "CoOp"}))["coop_xd"]
    assert (xd["source"], xd["datasets"], xd["variants"]) == ("mini_union", ["mini_shapes"], [])
    dg = _tasks(experiment("dg", {**SMOKE, "VLTUNE_METHODS": "CoOp", "VLTUNE_DATASETS": "imagenetv2 imagenet_a"}))
    assert (dg["coop_dg"]["source"], dg["coop_dg"]["variants"]) == ("mini_union", ["mini_union_v2",
                                                                                   "mini_union_noise"])
    grids = {t: v["grid"]["params"] for t, v in _tasks(experiment("ablation", SMOKE)).items()}
    assert grids["skiptuning_ablation_start_layer"] == {"TRAINER.SKIP.START_LAYER": [0, 1]}
    with pytest.raises(SuiteError, match="--smoke runs the mini CLIP"):
        experiment("b2n", {**SMOKE, "VLTUNE_BACKBONE": "ViT-B/16"})


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_dry_run_lists_every_method_of_the_preset(script, tmp_path):
    run = _script(script, "--smoke", "--dry-run", "--data", str(tmp_path / "data"), cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    protocol = SCRIPTS[script]
    entry = {"dg": "xd", "ablation": "b2n"}.get(protocol, protocol)
    wanted = ["SkipTuning"] if protocol == "ablation" else [m for m, c in presets.methods().items() if c[entry]]
    listed = {line.split()[2] for line in run.stdout.splitlines() if line.startswith("#")}
    assert {t.split("_")[0] for t in listed} == {m.lower() for m in wanted}
    if protocol != "ablation":  # the others are left out with their registration's reason
        assert all(f"{m} left out" in run.stderr for m in set(presets.methods()) - set(wanted))
    datasets = {line.split()[4] for line in run.stdout.splitlines() if line.startswith("#")}
    assert datasets and datasets <= set(smoke.STANDINS.values())
    assert not (tmp_path / "data").exists()  # a dry run generates nothing


# ---------------------------------------------------------------------------------------- fp16 on the CPU
def test_on_the_cpu_every_fp16_preset_runs_in_amp_and_the_note_is_printed_once(capsys):
    for protocol in ("b2n", "fewshot", "xd", "ablation"):
        names = experiment(protocol, {"VLTUNE_GPUS": "cpu"})
        printed = capsys.readouterr().err
        switched = []
        for task in _tasks(names).values():
            trainer = task["trainer"]
            path = task["config"] if os.path.isabs(task["config"]) else \
                REPO / "configs" / "trainers" / trainer / f"{task['config']}.yaml"
            node = getattr(TRAINERS.get(trainer), "config_node", None)
            cfg = get_cfg(config_file=str(path), opts=["TRAINER.NAME", trainer, *task["opts"]])
            assert precision_setting(cfg, node)[1] != "fp16", (protocol, trainer)
            before = get_cfg(config_file=str(path), opts=["TRAINER.NAME", trainer])
            if precision_setting(before, node)[1] == "fp16" and trainer not in switched:
                switched.append(trainer)
        assert "FinetuneCLIP" not in switched and ("CoOp" in switched) == (protocol != "ablation"), protocol
        lines = [line for line in printed.splitlines() if line.startswith(NOTE)]
        assert lines == ([f"{NOTE}: {', '.join(switched)}"] if switched else []), protocol
    names = experiment("b2n", {"VLTUNE_GPUS": "0"})  # on a GPU the preset's precision stays
    assert not any(o.endswith(".PREC") for t in _tasks(names).values() for o in t["opts"])
    assert NOTE not in capsys.readouterr().err


def test_cocoop_switches_its_own_node_and_coop_the_shared_key():
    tasks = _tasks(experiment("b2n", {"VLTUNE_GPUS": "cpu", "VLTUNE_METHODS": "CoCoOp CoOp",
                                      "VLTUNE_OPTS": "TRAINER.PREC fp16"}))
    assert tasks["cocoop_b2n"]["opts"][-2:] == ["TRAINER.COCOOP.PREC", "amp"]  # its yaml sets PREC fp16 there
    assert tasks["coop_b2n"]["opts"] == ["TRAINER.PREC", "fp16", "TRAINER.PREC", "amp"]  # amp wins, after the user


# ------------------------------------------------------------------------------------- unknown names
def test_unknown_names_fail_with_did_you_mean():
    with pytest.raises(SuiteError, match=r"unknown dataset 'oxford_pet' \(did you mean oxford_pets"):
        experiment("b2n", {"VLTUNE_DATASETS": "oxford_pet dtd"})
    with pytest.raises(SuiteError, match="'imagenet_sketch' is a dataset .* not part of the base-to-new benchmark"):
        experiment("b2n", {"VLTUNE_DATASETS": "imagenet_sketch"})
    with pytest.raises(SuiteError, match=r"'digits' is a dataset .*\(MiniBench stand-ins need --smoke\)"):
        experiment("xd", {"VLTUNE_DATASETS": "digits"})
    with pytest.raises(SuiteError, match=r"unknown method 'CoOpp' \(did you mean CoOp.*; methods: Zeroshot"):
        experiment("b2n", {"VLTUNE_METHODS": "CoOpp"})
    with pytest.raises(SuiteError, match=r"unknown method 'maple' \(did you mean MaPLe"):
        experiment("b2n", {"VLTUNE_METHODS": "maple"})
    assert list(_tasks(experiment("b2n", {"VLTUNE_METHODS": "FTCLIP"}))) == ["finetuneclip_b2n"]  # an alias
    assert _tasks(experiment("dg", {"VLTUNE_DATASETS": "imagenet imagenet_r"}))["coop_dg"]["variants"] == [
        "imagenet_r"]  # the source always runs; naming it is no mistake


@pytest.mark.parametrize(("args", "message"), [
    (["--datasets", "oxford_pet"], "unknown dataset 'oxford_pet' (did you mean oxford_pets"),
    (["--methods", "CoOpp"], "unknown method 'CoOpp' (did you mean CoOp"),
])
def test_scripts_exit_non_zero_on_an_unknown_name(args, message, tmp_path):
    run = _script("base2new", "--dry-run", "--gpus", "cpu", *args, cwd=str(tmp_path))
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


# ------------------------------------------------------------------------------------------ real runs
def _records(root) -> list[dict]:
    found = []
    for folder, _, files in os.walk(root):
        if "result.json" in files:
            with open(os.path.join(folder, "result.json")) as f:
                found.append(json.load(f))
    return found


def _check_outputs(out, jobs: int) -> None:
    records = _records(out)
    assert len(records) == jobs and all(r["status"] == "success" for r in records), records
    assert {r["config"]["MODEL"]["BACKBONE"]["NAME"] for r in records} == {"vltune-tiny"}
    tables = {p.name for p in (out / "tables").glob("*.csv")}
    assert "compare_cost.csv" in tables and len(tables) > 1, tables
    assert (out / "report.md").read_text().startswith("# Results\n\n## Comparison")


@pytest.mark.slow
@pytest.mark.parametrize(("script", "methods", "jobs", "amp"), [
    ("base2new", "ZeroshotCLIP CoOp", 4, "ZeroshotCLIP, CoOp"),
    ("few_shot", "CoOp", 3, "CoOp"),  # one job per CoOp few-shot config (1, 2 and 8 shots)
    ("cross_dataset", "SkipTuning", 2, ""),  # mini_union source, mini_shapes target
    ("domain_generalization", "MaPLe", 2, "MaPLe"),  # the mini CLIP's prompt depth
    ("ablation_skiptuning", "SkipTuning", 12, ""),  # 3 grids x 2 values x (train base + test new)
])
def test_smoke_runs_each_script_on_the_minibench_root(script, methods, jobs, amp, minibench, tmp_path):
    root, weights = minibench
    out = tmp_path / "out"
    run = _script(script, "--smoke", "--data", root, "--weights", weights, "--methods", methods, "--output",
                  str(out), "--", "--plain", "--no-mail", cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _check_outputs(out, jobs)
    notes = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(NOTE)]
    assert notes == ([f"{NOTE}: {amp}"] if amp else [])


@pytest.mark.slow
def test_smoke_generates_a_fresh_minibench_root(minibench, tmp_path):
    """The data are made on first use (about 15 s on 2 cores); the mini CLIP comes from the fixture's cache, as its
    pretraining takes minutes on 2 busy cores."""
    weights = minibench[1]
    run = _script("base2new", "--smoke", "--data", "data", "--weights", weights, "--methods", "CoOp", "--output",
                  "out", "--", "--plain", "--no-mail", cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "MiniBench ready" in run.stdout
    assert (tmp_path / "data" / "mini_shapes" / "split_zhou_MiniShapes.json").is_file()  # relative to the cwd
    _check_outputs(tmp_path / "out", 2)
