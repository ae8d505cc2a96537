"""The Skip Tuning repository's configs.py format: translated into vltune's tasks (b2n, xd with its variants, all →
few-shot, grid_search → grid), run end to end on MiniBench with its tables in output.result / output.cost and its
remove_dirs emptied (only inside the output root), its mail password refused, and every mistake of a configs.py (both
formats) reported in one error."""

from __future__ import annotations

import csv
import os
import re
import textwrap

import pytest
from conftest import REPO

import parallel_runner
from vltune.results.record import find_records
from vltune.runner.schema import SuiteError, load_experiments

# Our own file in the Skip Tuning layout: a base every task is deep-merged over, tasks that override parts of it, a
# pipeline of task names, and the get_pipeline() that merges them with deepmerge.
SEED = '''
import copy
from deepmerge import Merger

base = dict(
    data=dict(root={root!r}, datasets_base_to_new=["digits"], datasets_all=["digits"],
              datasets_cross_dataset=["digits", "mini_shapes", "mini_union_sketch", "imagenet_r"]),
    model=dict(backbone="vltune-tiny", weights={weights!r}),
    train=dict(mode="b2n", seeds=[1], load_from="", loadep=-1, shots=2, opts=["OPTIM.MAX_EPOCH", 1]),
    grid_search=dict(plot="line", mode="sequential", params=[]),
    output=dict(root="runs", result="runs/results/acc", cost="runs/results/cost", remove_dirs={remove_dirs}),
    mail=dict(username="me@example.org", host="smtp.example.org", to="me@example.org"{mail}),
)

skip_b2n = dict(train=dict(trainer="SkipTuning", cfg="mini"))
skip_lr = dict(
    train=dict(mode="all", trainer="SkipTuning", cfg="mini"),
    grid_search=dict(plot="col", params=[dict(name="OPTIM.LR", alias="lr", values=[0.002, 0.001])]),
)
{extra}
pipeline = [dict(gpu_ids={gpus}, tasks={tasks})]


def get_pipeline():
    global base, pipeline
    pipeline = copy.deepcopy(pipeline)
    merger = Merger([(list, ["override"]), (dict, ["merge"]), (set, ["override"])], ["override"], ["override"])
    for pipe in pipeline:
        merged = []
        for name in pipe["tasks"]:
            cfg = merger.merge(copy.deepcopy(base), copy.deepcopy(eval(name)))
            cfg["gpu_ids"], cfg["name"] = pipe["gpu_ids"], name
            merged.append(cfg)
        pipe["tasks"] = merged
    return pipeline
'''


def _seed(folder, root: str = "data", weights: str = "w.pt", remove_dirs: str = "[]", mail: str = "",
          extra: str = "", gpus: str = "[]", tasks: str = '["skip_b2n", "skip_lr"]') -> str:
    path = folder / "configs.py"
    path.write_text(SEED.format(root=root, weights=weights, remove_dirs=remove_dirs, mail=mail,
                                extra=textwrap.dedent(extra), gpus=gpus, tasks=tasks))
    return str(path)


def test_the_seed_format_translates_into_vltune_tasks(tmp_path):
    extra = """
    skip_xd = dict(train=dict(mode="xd", trainer="SkipTuning", cfg="vit_b16_bs4_cross_datasets"))
    skip_all = dict(train=dict(mode="all", trainer="SkipTuning", cfg="vit_b16_bs4_few_shot"),
                    grid_search=dict(mode="grid", params=[dict(name="DATASET.NUM_SHOTS", alias="shot", values=[1, 2]),
                                                          dict(name="OPTIM.LR", alias="lr", values=[0.1, 0.2])]))
    """
    path = _seed(tmp_path, extra=extra, tasks='["skip_b2n", "skip_lr", "skip_xd", "skip_all"]')
    exp = load_experiments(path, str(REPO))
    b2n, lr, xd, every = (exp.tasks[t] for t in ("skip_b2n", "skip_lr", "skip_xd", "skip_all"))
    assert (b2n.protocol, b2n.trainer, b2n.config, b2n.datasets) == ("b2n", "SkipTuning", "mini", ["digits"])
    assert (b2n.seeds, b2n.shots, b2n.opts) == ([1], [2], ["OPTIM.MAX_EPOCH", "1"])
    assert lr.protocol == "fewshot" and (lr.grid.params, lr.grid.mode) == ({"OPTIM.LR": [0.002, 0.001]}, "zip")
    # xd: trained on ImageNet as upstream; the domain-shifted sets (MiniUnion's and ImageNet's) become variants
    assert (xd.protocol, xd.source, xd.datasets) == ("xd", "imagenet", ["digits", "mini_shapes"])
    assert xd.variants == ["mini_union_sketch", "imagenet_r"]
    assert every.grid.mode == "product" and len(every.grid.points()) == 4
    assert exp.base.backbone == "vltune-tiny" and exp.base.output_root == str(tmp_path / "runs")
    mail = exp.base.mail
    assert (mail.enabled, mail.user, mail.host, mail.to) == (True, "me@example.org", "smtp.example.org",
                                                             ["me@example.org"])
    seed = exp.seed.tasks["skip_lr"]
    assert seed.result_dir == str(tmp_path / "runs" / "results" / "acc" / "skip_lr") and seed.plot == "col"
    assert seed.cost_dir == str(tmp_path / "runs" / "results" / "cost" / "skip_lr")


def test_without_get_pipeline_the_tasks_merge_over_base_by_the_same_rules(tmp_path):
    with_function = load_experiments(_seed(tmp_path), str(REPO))
    (tmp_path / "bare").mkdir()
    path = _seed(tmp_path / "bare")
    text = open(path).read()
    open(path, "w").write(text[:text.index("def get_pipeline")])
    without = load_experiments(path, str(REPO))
    assert without.tasks.keys() == with_function.tasks.keys()
    for name, task in without.tasks.items():  # lists override (opts, params), dicts merge (train over base's train)
        assert (task.opts, task.grid, task.seeds, task.shots) == (with_function.tasks[name].opts,
                                                                  with_function.tasks[name].grid, [1], [2])


def test_without_a_model_key_the_backbone_comes_from_the_trainer_yaml(tmp_path):
    path = _seed(tmp_path)
    text = open(path).read().replace("model=dict(", "# model=dict(")
    text = text.replace('cfg="mini"', 'cfg="vit_b16_bs4"')
    open(path, "w").write(text)
    exp = load_experiments(path, str(REPO))
    assert (exp.base.backbone, exp.base.weights) == ("ViT-B/16", "")


def test_the_mail_password_is_refused_before_any_job(tmp_path, capsys):
    path = _seed(tmp_path, mail=", password='password here'")
    with pytest.raises(SuiteError, match=r"base\['mail'\]\['password'\]: the SMTP password never goes in "
                                         r"configs.py.*VLTUNE_SMTP_PASSWORD.*password_file") as info:
        load_experiments(path, str(REPO))
    assert "password here" not in str(info.value)  # the secret is not echoed
    assert parallel_runner.main(["--config", path]) == 2
    assert "VLTUNE_SMTP_PASSWORD" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_remove_dirs_outside_the_output_root_are_refused_on_load(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "runs").mkdir()
    os.symlink(outside, tmp_path / "runs" / "link")
    path = _seed(tmp_path, remove_dirs='["result", "runs/link", "runs", "runs/old"]')
    text = open(path).read().replace('result="runs/results/acc"', 'result="results/acc"')
    open(path, "w").write(text)
    with pytest.raises(SuiteError) as info:
        load_experiments(path, str(REPO))
    message = str(info.value)
    for name in ("skip_b2n", "skip_lr"):
        assert f"task {name!r}: output.remove_dirs entry 'result' is {tmp_path / 'results' / 'acc' / name}, " \
               "not inside the output root" in message
        assert f"task {name!r}: output.remove_dirs entry 'runs/link'" in message  # a symlink out is outside
        assert f"task {name!r}: output.remove_dirs entry 'runs' is" in message  # the root itself is not inside
    assert "'runs/old'" not in message and outside.exists()


def test_every_mistake_of_a_seed_configs_py_is_reported_at_once(tmp_path):
    extra = """
    skip_typo = dict(train=dict(mode="b2m", trainer="SkipTuning", cfg="mini", load_from="old/runs", loadep=5),
                     data=dict(datasets_base_to_new=["digit", "mini_shape"]), grid_search=dict(plot="pie"))
    """
    path = _seed(tmp_path, extra=extra, gpus="[5]", tasks='["skip_b2n", "skip_typo", "skip_missing"]')
    text = open(path).read().replace("datasets_all=", "datasets_al=")
    open(path, "w").write(text)
    with pytest.raises(SuiteError) as info:
        load_experiments(path, str(REPO))
    message = str(info.value)
    expected = [
        r"base\['data'\]: unknown key 'datasets_al' \(did you mean datasets_all",
        r"task 'skip_typo': train.mode 'b2m' \(did you mean b2n",
        r"task 'skip_typo': train.load_from = 'old/runs': vltune does not copy",
        r"task 'skip_typo': train.loadep = 5",
        r"task 'skip_typo': grid_search.plot 'pie' \(did you mean line\?\); choose one of line, col, heat",
        r"pipeline\[0\]: unknown task 'skip_missing' .*tasks defined: skip_b2n, skip_lr, skip_typo",
        r"GPU id 5 does not exist",
    ]
    for pattern in expected:
        assert re.search(pattern, message), pattern
    assert message.startswith(f"{path}: {len(info.value.problems)} problems; nothing was run")
    assert len(info.value.problems) >= len(expected) and "\n  1. " in message and "\n  7. " in message
    # with the translation's own mistakes fixed, the task's validation names every unknown dataset
    open(path, "w").write(text.replace('"b2m"', '"b2n"').replace('"old/runs"', '""').replace("loadep=5", "loadep=-1")
                          .replace('"pie"', '"heat"').replace("datasets_al=", "datasets_all="))
    with pytest.raises(SuiteError) as info:
        load_experiments(path, str(REPO))
    message = str(info.value)
    assert "task 'skip_typo': unknown dataset 'digit'" in message
    assert "task 'skip_typo': unknown dataset 'mini_shape'" in message and "GPU id 5" in message


def test_every_mistake_of_a_vltune_configs_py_is_reported_at_once(tmp_path):
    path = tmp_path / "configs.py"
    path.write_text(textwrap.dedent("""
        base = dict(data=dict(root="data"), model=dict(backbone="vltune-tiny"), outpt=dict(root="out"),
                    slots_per_gpu="2")
        a = dict(trainer="CoOp", config="tiny_ep10", protocol="b2m", datasets=["digit", "mini_shape"])
        b = dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"], seeds="1,2")
        pipeline = [dict(gpu_ids=[3], tasks=["a", "b", "c"]), dict(gpus=[], tasks=["a"])]
    """))
    with pytest.raises(SuiteError) as info:
        load_experiments(str(path), str(REPO))
    problems = info.value.problems
    expected = ["base: unknown key 'outpt'", "base: 'slots_per_gpu' = '2'", "base['output'] is missing",
                "pipeline[0]: unknown task 'c'", "pipeline[1]: unknown key 'gpus'", "GPU id 3 does not exist",
                "task 'a': protocol 'b2m'", "task 'a': unknown dataset 'digit'",
                "task 'a': unknown dataset 'mini_shape'", "task 'b': 'seeds' = '1,2'"]
    for text in expected:
        assert sum(p.startswith(text) for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected)
    assert str(info.value).startswith(f"{path}: {len(expected)} problems")


def test_dry_run_lists_the_folders_remove_dirs_would_empty(tmp_path, capsys, digits_root, tiny_clip_weights):
    path = _seed(tmp_path, root=digits_root, weights=tiny_clip_weights, remove_dirs='["root", "result"]')
    (tmp_path / "runs" / "skip_b2n").mkdir(parents=True)
    assert parallel_runner.main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("skip_b2n", "skip_lr"):
        assert f"task {name}: would remove {tmp_path / 'runs' / name} (remove_dirs 'root')" in out
        assert f"task {name}: would remove {tmp_path / 'runs' / 'results' / 'acc' / name} (remove_dirs 'result')" \
            in out
    assert "task skip_lr: grid_search.plot 'col' is recorded" in out
    assert (tmp_path / "runs" / "skip_b2n").is_dir()  # a dry run removes nothing


@pytest.mark.slow  # 4 train.py jobs of the mini Skip Tuning (about 40 s on 2 cores)
def test_a_seed_configs_py_runs_on_minibench_with_its_tables_in_result_and_cost(tmp_path, minibench, capsys):
    root, weights = minibench
    path = _seed(tmp_path, root=root, weights=weights, remove_dirs='["root", "result"]')
    stale = [tmp_path / "runs" / "skip_b2n" / "stale.txt", tmp_path / "runs" / "results" / "acc" / "skip_lr" / "x"]
    for f in stale:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("from an earlier run")
    assert parallel_runner.main(["--config", path, "--plain", "--no-mail"]) == 0
    out = capsys.readouterr().out
    assert f"Removing directory {tmp_path / 'runs' / 'skip_b2n'} (remove_dirs 'root' of task skip_b2n)" in out
    assert not any(f.exists() for f in stale)
    records = find_records(str(tmp_path / "runs"))
    assert sorted((r.job.task, r.job.role) for r in records) == [("skip_b2n", "base"), ("skip_b2n", "new"),
                                                                  ("skip_lr", "fewshot"), ("skip_lr", "fewshot")]
    assert all(r.status == "success" for r in records)
    acc, cost = tmp_path / "runs" / "results" / "acc", tmp_path / "runs" / "results" / "cost"
    with open(acc / "skip_b2n" / "skip_b2n.b2n.csv") as f:
        digits = next(r for r in csv.DictReader(f) if r["dataset"].strip("*") == "Digits")
    base = next(r for r in records if r.job.role == "base").metrics["accuracy"]
    assert float(digits["base mean"]) == pytest.approx(base)
    assert (acc / "skip_lr" / "skip_lr.grid.csv").is_file() and (acc / "skip_lr" / "grid_skip_lr.png").is_file()
    assert len(list((acc / "skip_lr").glob("skip_lr.LR-*.fewshot.csv"))) == 2
    for name in ("skip_b2n", "skip_lr"):
        with open(cost / name / f"{name}.cost.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows[0]["method"].startswith("SkipTuning") and rows[-1]["method"] == "average"
    assert (tmp_path / "runs" / "report.md").is_file()
