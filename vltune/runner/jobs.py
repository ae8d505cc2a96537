"""Tasks expanded into jobs: one ``train.py`` run per (dataset, seed, shots, grid point) and protocol role.

Protocols (protocols_and_numbers.md §2-5):

* ``b2n``: train on the base half of the classes (``role=base``; its final test is the base accuracy), then
  evaluate the saved model on the new half (``role=new``, eval-only, depends on the train job);
* ``fewshot``: train on K shots per class for each K, test on all classes (``role=fewshot``);
* ``xd``: train once on ``source`` (``role=source``), then evaluate that model on every target dataset
  (``role=target``, cross-dataset) and every variant (``role=variant``, domain generalisation).

A task with ``eval_only`` (zero-shot CLIP) trains nothing: every job evaluates and depends on nothing.
Job folders: ``<output>/<task>/<train_base|test_new|dataset folders>/<dataset>/shots<K>/[<grid point>/]seed<S>``.
Each job's place in the suite (task, protocol, role, grid point, index) goes to ``train.py`` as ``--job-meta`` and
so into its ``result.json``, from which tables are built; the scheduler also writes ``job.json`` beside it for
people reading the folder.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from vltune.fileio import atomic_write
from vltune.runner.schema import Base, Experiments, SuiteError, Task

SHOTS_KEY = "DATASET.NUM_SHOTS"


@dataclass
class Job:
    """One process of the suite: its argv, its folder, what it needs first, and its place in the tables."""

    task: str
    out: str
    argv: list[str]
    depends_on: str = ""  # ``out`` of the job whose result this one needs (an evaluation's train job)
    protocol: str = ""
    role: str = ""
    trainer: str = ""
    config: str = ""
    dataset: str = ""
    seed: int = 0
    shots: int = 0
    grid: dict[str, Any] = field(default_factory=dict)
    grid_name: str = ""
    identity: dict[str, Any] = field(default_factory=dict)  # what a finished result.json must match (see
    # vltune.config.identity); empty: any successful record counts
    identity_hash: str = ""
    index: int = 0  # position in the full pipeline (table order)
    clip_weights: tuple[str, str, str] = ()  # (MODEL.BACKBONE.NAME, WEIGHTS, PRETRAINED) of its config, set by
    # ``expand``: the runner fetches each distinct one once, before any job starts (``fetch_weights_once``)

    @property
    def label(self) -> str:
        parts = [self.task, self.role, self.dataset, f"seed{self.seed}"]
        if self.shots:
            parts.append(f"{self.shots}shot")
        if self.grid_name:
            parts.append(self.grid_name)
        return " ".join(p for p in parts if p)

    def write_job_file(self) -> None:
        d = asdict(self)
        atomic_write(os.path.join(self.out, "job.json"), (json.dumps(d, indent=2, default=str) + "\n").encode())


def grid_label(point: dict[str, Any]) -> str:
    """A short, folder-safe name for a grid point: the keys' last components (full keys if those collide)."""
    short = [k.split(".")[-1] for k in point]
    names = short if len(set(short)) == len(short) else list(point)
    text = ",".join(f"{n}={v}" for n, v in zip(names, point.values()))
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def expand_task(task: Task, base: Base, repo: str) -> list[Job]:
    """Every job of ``task``, each train job before the evaluations that depend on it."""
    root = os.path.join(base.output_root, task.name)
    train_py = os.path.join(repo, "train.py")
    points = task.grid.points() if task.grid else [{}]

    def job(role: str, dataset: str, seed: int, shots: int, out: str, point: dict[str, Any], subsample: str = "all",
            model_dir: str = "", train: bool = False) -> Job:
        argv = [sys.executable, train_py, "--root", base.data_root, "--seed", str(seed), "--trainer", task.trainer,
                "--dataset-config-file", os.path.join(repo, "configs", "datasets", f"{dataset}.yaml"),
                "--config-file", task.config_file, "--output-dir", out]
        if not train:
            argv.append("--eval-only")
        if model_dir:
            argv += ["--model-dir", model_dir, "--load-epoch", "-1"]
        argv += ["MODEL.BACKBONE.NAME", base.backbone, "DATASET.SUBSAMPLE_CLASSES", subsample]
        if base.weights:
            argv += ["MODEL.BACKBONE.WEIGHTS", base.weights]
        if base.pretrained:
            argv += ["MODEL.BACKBONE.PRETRAINED", base.pretrained]
        if shots > 0:
            argv += [SHOTS_KEY, str(shots)]
        argv += task.opts
        for key, value in point.items():
            if key != SHOTS_KEY:
                argv += [key, str(value)]
        label = grid_label({k: v for k, v in point.items() if k != SHOTS_KEY}) if point else ""
        return Job(task=task.name, out=out, argv=argv, depends_on=model_dir, protocol=task.protocol, role=role,
                   trainer=task.trainer, config=task.config_name, dataset=dataset, seed=seed, shots=shots,
                   grid=dict(point), grid_name=label)

    def folder(*parts: str, point: dict[str, Any], seed: int) -> str:
        rest = {k: v for k, v in point.items() if k != SHOTS_KEY}
        return os.path.join(root, *parts, *([grid_label(rest)] if rest else []), f"seed{seed}")

    jobs: list[Job] = []
    for point in points:
        shots_list = [int(point[SHOTS_KEY])] if SHOTS_KEY in point else task.shots
        for seed in task.seeds:
            if task.protocol == "b2n":
                k = 0 if task.eval_only else shots_list[0]
                for d in task.datasets:
                    train_dir = folder("train_base", d, f"shots{k}", point=point, seed=seed)
                    new_dir = folder("test_new", d, f"shots{k}", point=point, seed=seed)
                    jobs.append(job("base", d, seed, k, train_dir, point, "base", train=not task.eval_only))
                    jobs.append(job("new", d, seed, k, new_dir, point, "new",
                                    model_dir="" if task.eval_only else train_dir))
            elif task.protocol == "fewshot":
                for k in [0] if task.eval_only else shots_list:
                    for d in task.datasets:
                        jobs.append(job("fewshot", d, seed, k, folder(d, f"shots{k}", point=point, seed=seed), point,
                                        train=not task.eval_only))
            else:
                k = 0 if task.eval_only else shots_list[0]
                source_dir = folder(task.source, f"shots{k}", point=point, seed=seed)
                jobs.append(job("source", task.source, seed, k, source_dir, point, train=not task.eval_only))
                model_dir = "" if task.eval_only else source_dir
                for role, names in (("target", task.datasets), ("variant", task.variants)):
                    for d in names:
                        jobs.append(job(role, d, seed, 0, folder(d, "eval", point=point, seed=seed), point,
                                        model_dir=model_dir))
    return jobs


def expand(experiments: Experiments, repo: str, only: list[str] | None = None, hashes: bool = True,
           check_files: bool = True) -> list[Job]:
    """All jobs of the pipeline (or only the named tasks), with their config hashes, checked before anything runs.

    Building each job's config here validates every trainer config, dataset yaml, ``opts``, grid key and value
    (``vltune.config.validate``); with ``check_files`` every job's weights file and dataset folder must exist too
    (skipped for ``prepare="minibench"``, which makes both after expansion). Every problem of every job is collected
    into one ``SuiteError`` naming the task, the job and the key or file (see ``preflight``).
    """
    for name in only or []:
        if name not in experiments.tasks:
            raise SuiteError(f"--only: unknown task {name!r}; tasks in the pipeline: "
                             f"{', '.join(experiments.tasks)}")
    jobs: list[Job] = []
    for stage in experiments.pipeline:
        for name in stage.tasks:
            for j in expand_task(experiments.tasks[name], experiments.base, repo):
                j.index = len(jobs)
                jobs.append(j)
    for j in jobs:
        meta = {"task": j.task, "protocol": j.protocol, "role": j.role, "grid": j.grid, "grid_name": j.grid_name,
                "index": j.index}
        j.argv[2:2] = ["--job-meta", json.dumps(meta, default=str)]
    if only:
        jobs = [j for j in jobs if j.task in only]
    configs = preflight(jobs, check_files=check_files and experiments.base.prepare != "minibench")
    for j, cfg in zip(jobs, configs):
        backbone = cfg.MODEL.BACKBONE
        j.clip_weights = (backbone.NAME, backbone.WEIGHTS, backbone.PRETRAINED)
    if hashes:
        fill_identities(jobs, configs)
    return jobs


def preflight(jobs: list[Job], check_files: bool = True) -> list[Any]:
    """Build and validate every job's config; with ``check_files`` also check that its weights file and dataset
    folder exist. Returns the configs (in job order) when nothing is wrong.

    A mistake found only when a job starts fails every job of a suite one by one (a missing weights file, an
    unknown optimizer); here all of them are listed at once, before anything runs, also under ``--dry-run``. A
    problem shared by several jobs of a task is listed once, with the count of the other jobs it affects. Weights
    that are not on disk but can be downloaded (a Dassl name, an open_clip pretrained tag) are not missing, unless
    offline: the runner fetches them before the first job (``fetch_weights_once``).

    Raises:
        SuiteError: listing every problem, each naming the task, the (first) job and the key or file.
    """
    from vltune.cli import job_config
    from vltune.config import ConfigError
    from vltune.config.validate import trainer_trains, validate_cfg
    from vltune.registry import RegistryError

    problems: dict[tuple[str, str], list[str]] = {}
    configs: list[Any] = []
    checked: dict[tuple[str, ...], str] = {}  # a file check's result, shared by the jobs that need the same file
    for j in jobs:
        found: list[str] = []
        try:
            cfg = job_config(j.argv[2:])
            validate_cfg(cfg, trainer_trains(cfg.TRAINER.NAME, eval_only="--eval-only" in j.argv))
        except (ConfigError, RegistryError, FileNotFoundError) as e:
            cfg = None
            found.append(str(e))
        configs.append(cfg)
        if cfg is not None and check_files:
            backbone = cfg.MODEL.BACKBONE
            for key in (("weights", backbone.NAME, backbone.WEIGHTS, backbone.PRETRAINED),
                        ("dataset", cfg.DATASET.NAME, cfg.DATASET.ROOT)):
                if key not in checked:
                    checked[key] = _missing_weights(*key[1:]) if key[0] == "weights" else _missing_dataset(*key[1:])
                if checked[key]:
                    found.append(checked[key])
        for text in found:
            problems.setdefault((j.task, text), []).append(j.label)
    if problems:
        lines = []
        for (task, text), labels in problems.items():
            more = f" (and {len(labels) - 1} more job(s) of this task)" if len(labels) > 1 else ""
            lines.append(f"  - task {task!r}, job {labels[0]}{more}: " + text.replace("\n", "\n      "))
        raise SuiteError(f"pre-flight found {len(problems)} problem(s); nothing was run:\n" + "\n".join(lines))
    return configs


def _missing_weights(backbone: str, weights: str, pretrained: str = "") -> str:
    """"" when the weights of ``backbone`` are on disk (``MODEL.BACKBONE.WEIGHTS``, the default search path or the
    tag's cached file) or can be downloaded before the jobs start, else why not."""
    from vltune.clip.loading import pending_download

    try:
        pending_download(backbone, weights, pretrained)
    except (FileNotFoundError, ValueError) as e:
        key = f"MODEL.BACKBONE.PRETRAINED {pretrained!r}" if pretrained else f"MODEL.BACKBONE.WEIGHTS {weights!r}"
        return f"{key}: {e}"
    return ""


def fetch_weights_once(jobs: list[Job], dry_run: bool = False,
                       echo: Callable[[str], None] = functools.partial(print, flush=True)) -> list[str]:
    """Download, in this process, every distinct weights file the jobs need that is not on disk yet, one line each.

    The driver does this once before any job starts, so N jobs never race for (or each fetch) the same file; the
    jobs then find it. With ``dry_run`` it only says what would be downloaded.

    Returns:
        The lines printed (one per file downloaded or to download).

    Raises:
        SuiteError: a download failed (network, checksum) or a file is missing and cannot be downloaded; no job has
            started.
    """
    from vltune.clip.download import DownloadError
    from vltune.clip.loading import fetch_weights, pending_download

    lines = []
    # an explicit MODEL.BACKBONE.WEIGHTS file is never downloaded (pre-flight checks it; MiniBench makes its own)
    needed = dict.fromkeys(j.clip_weights for j in jobs if j.clip_weights and not j.clip_weights[1])
    for name, weights, pretrained in needed:
        try:
            what = pending_download(name, weights, pretrained)
            if not what:
                continue
            lines.append(f"{'would download' if dry_run else 'downloading'} weights for {name}: {what}")
            echo(lines[-1])
            if not dry_run:
                fetch_weights(name, weights, pretrained)
        except (DownloadError, FileNotFoundError, ValueError) as e:
            users = sum(j.clip_weights == (name, weights, pretrained) for j in jobs)
            raise SuiteError(f"weights for MODEL.BACKBONE.NAME {name!r} ({users} job(s)): {e}\n"
                             "no job was started") from e
    return lines


def _missing_dataset(name: str, root: str) -> str:
    """"" when the dataset ``name`` looks usable under ``root`` by its own layout (its folder, image folder and split
    file, or a way to rebuild the split), else what is missing. Nothing is read or decoded: a fast check;
    ``python -m vltune.data check`` does the thorough one."""
    from vltune.data.base import CoOpDataset
    from vltune.registry import DATASETS

    cls = DATASETS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, CoOpDataset)):
        return ""
    ds = cls.at(root)
    where = f"DATASET.ROOT {root!r}, dataset {name}"
    for path in (ds.dataset_path, ds.image_path):
        if not os.path.isdir(path):
            return (f"{where}: folder {path} not found; expected under the root: {ds.expected_layout()} "
                    "(python -m vltune.data check --root ROOT checks a data root)")
    rebuildable = type(ds).build_split is not CoOpDataset.build_split
    if ds.split_file and not ds.split_source() and not rebuildable:
        return f"{where}: split file {ds.split_path} not found; expected under the root: {ds.expected_layout()}"
    return ""


def fill_identities(jobs: list[Job], configs: list[Any] | None = None) -> None:
    """Set every job's identity from the config ``train.py`` will build (fails on any bad key), or from ``configs``
    (one per job, already built by ``preflight``). The weights digest is computed once per weights file and cached
    for the jobs. A weights file that does not exist yet (MiniBench makes its mini CLIP before the first job) gives
    ``missing:<path>``: ``refresh_identities`` fills it in later."""
    from vltune.cli import job_config
    from vltune.config import ConfigError
    from vltune.config.identity import identity, identity_hash
    from vltune.registry import RegistryError

    for i, j in enumerate(jobs):
        try:
            j.identity = identity(configs[i] if configs else job_config(j.argv[2:]))
        except (ConfigError, RegistryError, FileNotFoundError) as e:
            raise SuiteError(f"task {j.task!r}, job {j.label}: {e}") from None
        j.identity_hash = identity_hash(j.identity)


def refresh_identities(jobs: list[Job]) -> None:
    """Recompute the identities whose weights file was missing when the jobs were expanded, once it exists."""
    from vltune.config.identity import WEIGHTS_KEY

    fill_identities([j for j in jobs if str(j.identity.get(WEIGHTS_KEY, "")).startswith("missing:")])
