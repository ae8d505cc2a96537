"""Tasks from ``configs.py`` expanded into ``train.py`` jobs, one per (dataset, seed, shots) and protocol role.

A task is a dict: ``trainer``, ``config`` (yaml under ``configs/trainers/<trainer>/``), ``protocol`` and the lists
it runs over. Protocols (protocols_and_numbers.md §2-5):

* ``b2n``: train on the base half of the classes (``role=base``; its final test is the base accuracy), then
  evaluate the saved model on the new half (``role=new``, eval-only, depends on the train job);
* ``fewshot``: train on K shots per class for each K in ``shots``, test on all classes (``role=fewshot``);
* ``xd``: train once on ``source`` (``role=source``), then evaluate that model on every dataset in ``datasets``
  (``role=target``, cross-dataset) and ``variants`` (``role=variant``, domain generalisation).

A task with ``eval_only=True`` (zero-shot CLIP) has no training: every job evaluates, and nothing depends on
anything. Every job writes ``job.json`` (its role in the suite) beside ``result.json`` so tables can be rebuilt from
the output folder alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from vltune.fileio import atomic_write

PROTOCOLS = ("b2n", "fewshot", "xd")
TASK_KEYS = ("trainer", "config", "protocol", "datasets", "seeds", "shots", "eval_only", "source", "variants", "opts")


@dataclass
class Job:
    """One ``train.py`` run and its place in the suite."""

    task: str
    protocol: str
    role: str
    trainer: str
    config: str
    dataset: str
    seed: int
    shots: int
    out: str
    argv: list[str] = field(default_factory=list)
    depends_on: str = ""  # output dir of the train job whose checkpoint this evaluation loads

    def write_job_file(self) -> None:
        atomic_write(os.path.join(self.out, "job.json"), (json.dumps(asdict(self), indent=2) + "\n").encode())


def load_experiments(path: str) -> dict[str, Any]:
    """The public names of an experiment file such as ``configs.py``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"experiment file not found: {path}")
    spec = importlib.util.spec_from_file_location("vltune_experiments", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: getattr(module, k) for k in dir(module) if not k.startswith("_")}


def _check_task(name: str, task: dict[str, Any], repo: str) -> None:
    unknown = sorted(set(task) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"task {name!r}: unknown keys {unknown}; valid keys: {', '.join(TASK_KEYS)}")
    for key in ("trainer", "config", "protocol", "datasets"):
        if key not in task:
            raise ValueError(f"task {name!r}: missing key {key!r}")
    if task["protocol"] not in PROTOCOLS:
        raise ValueError(f"task {name!r}: protocol {task['protocol']!r}; choose one of {', '.join(PROTOCOLS)}")
    if task["protocol"] == "xd" and "source" not in task:
        raise ValueError(f"task {name!r}: protocol 'xd' needs a 'source' dataset")
    yaml = os.path.join(repo, "configs", "trainers", task["trainer"], f"{task['config']}.yaml")
    if not os.path.isfile(yaml):
        raise FileNotFoundError(f"task {name!r}: trainer config {yaml} not found")
    for d in [*task["datasets"], *task.get("variants", []), *([task["source"]] if "source" in task else [])]:
        if not os.path.isfile(os.path.join(repo, "configs", "datasets", f"{d}.yaml")):
            raise FileNotFoundError(f"task {name!r}: dataset config configs/datasets/{d}.yaml not found")


def expand_task(name: str, task: dict[str, Any], base: dict[str, Any], repo: str) -> list[Job]:
    """Every job of ``task``, train jobs before the evaluations that depend on them."""
    _check_task(name, task, repo)
    trainer, config, protocol = task["trainer"], task["config"], task["protocol"]
    eval_only = bool(task.get("eval_only", False))
    root = os.path.join(base["output"]["root"], protocol)
    seeds = list(task.get("seeds", [1]))
    shots_list = task.get("shots", 16)
    shots_list = list(shots_list) if isinstance(shots_list, (list, tuple)) else [shots_list]

    def job(role: str, dataset: str, seed: int, shots: int, out: str, subsample: str = "all", model_dir: str = "",
            train: bool = False) -> Job:
        argv = [os.path.join(repo, "train.py"), "--root", base["data"]["root"], "--seed", str(seed), "--trainer",
                trainer, "--dataset-config-file", os.path.join(repo, "configs", "datasets", f"{dataset}.yaml"),
                "--config-file", os.path.join(repo, "configs", "trainers", trainer, f"{config}.yaml"),
                "--output-dir", out]
        if not train:
            argv.append("--eval-only")
        if model_dir:
            argv += ["--model-dir", model_dir, "--load-epoch", "-1"]
        argv += ["MODEL.BACKBONE.NAME", base["model"]["backbone"], "MODEL.BACKBONE.WEIGHTS", base["model"]["weights"],
                 "DATASET.SUBSAMPLE_CLASSES", subsample]
        if shots > 0:
            argv += ["DATASET.NUM_SHOTS", str(shots)]
        argv += [str(x) for x in task.get("opts", [])]
        return Job(name, protocol, role, trainer, config, dataset, seed, shots, out, argv, model_dir)

    jobs: list[Job] = []
    for seed in seeds:
        if protocol == "b2n":
            k = 0 if eval_only else shots_list[0]
            for d in task["datasets"]:
                train_dir = os.path.join(root, "train_base", trainer, d, f"shots{k}", config, f"seed{seed}")
                new_dir = os.path.join(root, "test_new", trainer, d, f"shots{k}", config, f"seed{seed}")
                jobs.append(job("base", d, seed, k, train_dir, "base", train=not eval_only))
                jobs.append(job("new", d, seed, k, new_dir, "new", "" if eval_only else train_dir))
        elif protocol == "fewshot":
            for k in [0] if eval_only else shots_list:
                for d in task["datasets"]:
                    out = os.path.join(root, trainer, d, f"shots{k}", config, f"seed{seed}")
                    jobs.append(job("fewshot", d, seed, k, out, train=not eval_only))
        else:
            k = 0 if eval_only else shots_list[0]
            source_dir = os.path.join(root, trainer, task["source"], f"shots{k}", config, f"seed{seed}")
            jobs.append(job("source", task["source"], seed, k, source_dir, train=not eval_only))
            model_dir = "" if eval_only else source_dir
            for role, names in (("target", task["datasets"]), ("variant", task.get("variants", []))):
                for d in names:
                    out = os.path.join(root, trainer, d, f"shots{k}", config, f"seed{seed}")
                    jobs.append(job(role, d, seed, 0, out, model_dir=model_dir))
    return jobs


def expand_pipeline(experiments: dict[str, Any], repo: str, only: list[str] | None = None) -> list[Job]:
    """All jobs of the pipeline's tasks, in pipeline order (optionally only the named tasks)."""
    base = experiments["base"]
    names = [t for stage in experiments["pipeline"] for t in stage["tasks"]]
    for name in names + list(only or []):
        if name not in experiments or not isinstance(experiments[name], dict):
            tasks = [k for k, v in experiments.items() if isinstance(v, dict) and "trainer" in v]
            raise ValueError(f"unknown task {name!r}; tasks defined: {', '.join(tasks)}")
    return [j for name in names if not only or name in only for j in expand_task(name, experiments[name], base, repo)]


def run_inline(jobs: list[Job]) -> list[tuple[Job, dict[str, Any] | None]]:
    """Run the jobs one after another in this process (``train.main``); skip evaluations whose train job failed."""
    import train
    from vltune.results.record import read_record

    results, failed_dirs = [], set()
    for i, j in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {j.task}: {j.trainer} {j.role} on {j.dataset} (seed {j.seed}, {j.shots} shots)",
              flush=True)
        os.makedirs(j.out, exist_ok=True)
        j.write_job_file()
        if j.depends_on in failed_dirs:
            results.append((j, None))
            failed_dirs.add(j.out)
            continue
        try:
            code = train.main(j.argv[1:], console=False)
        except SystemExit as e:  # a finished dir of another config: report it, keep going
            print(f"  {e}", file=sys.stderr)
            code = 2
        record = read_record(os.path.join(j.out, "result.json"))
        if code != 0 or not record or record.get("status") != "success":
            failed_dirs.add(j.out)
        results.append((j, record))
    return results
