"""``configs.py``, the runner's experiment file, validated into typed objects before anything runs.

An experiment file is Python (like the SkipTuning runner's): ``base`` (shared settings), one dict per task, and
``pipeline`` (which tasks run, in which order, on which GPUs). Every mistake (an unknown key, task, trainer, dataset,
trainer config, grid key or GPU id) is named with the valid choices, and all of them are raised on load in one
``SuiteError``: the base's, every pipeline entry's, every task's and the GPUs', so one edit fixes them all. The Skip
Tuning repository's format (``base`` with ``train``/``grid_search``) is translated first (``seed_configs.py``), then
goes through the same validation.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

PROTOCOLS = ("b2n", "fewshot", "xd")
GRID_MODES = ("product", "zip")
PREPARE = ("", "minibench")


class SuiteError(ValueError):
    """Mistakes in the experiment file; the message names the file, the key and the fix.

    Args:
        problems: one message, or several (each naming its key or task); ``problems`` keeps them for a caller that
            collects the problems of several parts into one error. Several read as numbered lines.
        head: the line before the numbered problems (e.g. the file).
    """

    def __init__(self, problems: str | Sequence[str], head: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(numbered(self.problems, head))


def numbered(problems: Sequence[str], head: str = "") -> str:
    """One problem as ``head: problem``; several as ``head: N problems ...`` and one numbered line each."""
    if len(problems) == 1:
        return f"{head}: {problems[0]}" if head else problems[0]
    lines = [f"{i}. " + p.replace("\n", "\n   ") for i, p in enumerate(problems, start=1)]
    intro = f"{len(problems)} problems; nothing was run (fix them all, then run again):"
    return "\n".join([f"{head}: {intro}" if head else intro, *(f"  {line}" for line in lines)])


class Problems:
    """Collects ``SuiteError`` problems from several checks, so one error can list them all."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, problem: str | SuiteError, prefix: str = "") -> None:
        found = problem.problems if isinstance(problem, SuiteError) else [problem]
        self.items += [prefix + p for p in found]

    @contextmanager
    def check(self, prefix: str = "") -> Iterator[None]:
        """Run the block; a ``SuiteError`` it raises is recorded (each problem after ``prefix``) instead."""
        try:
            yield
        except SuiteError as e:
            self.add(e, prefix)

    def raise_if_any(self, head: str = "") -> None:
        if self.items:
            raise SuiteError(self.items, head)


def _suggest(name: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _check_keys(where: str, given: Iterable[str], valid: Sequence[str]) -> None:
    """Raise one ``SuiteError`` naming every unknown key, each with a did-you-mean and the valid keys."""
    unknown = [key for key in given if key not in valid]
    if unknown:
        raise SuiteError([f"{where}: unknown key {key!r}{_suggest(key, valid)}; valid keys: {', '.join(valid)}"
                          for key in unknown])


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


#: what a configs.py value may be, by the name the errors use
_EXPECTED = {
    "str": "a string",
    "bool": "a bool (True or False)",
    "int": "an integer",
    "ints": "an integer or a list of integers, e.g. [1, 2, 3]",
    "strs": "a string or a list of strings",
    "dict": "a dict",
    "opts": "a list of KEY VALUE items, e.g. ['OPTIM.MAX_EPOCH', '5'] (keys strings, values strings or numbers)",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(value: Any, kind: str) -> bool:
    """Whether ``value`` has the type ``kind`` (a key of ``_EXPECTED``) asks for; a bool is not an integer."""
    seq = (list, tuple)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return _is_int(value)
    if kind == "ints":
        return _is_int(value) or (isinstance(value, seq) and all(_is_int(x) for x in value))
    if kind == "strs":
        return isinstance(value, str) or (isinstance(value, seq) and all(isinstance(x, str) for x in value))
    if kind == "dict":
        return isinstance(value, dict)
    return (isinstance(value, seq) and all(isinstance(x, str) for x in value[0::2])
            and all(isinstance(x, (str, int, float, bool)) for x in value[1::2]))


def _fix_for(value: Any, kind: str) -> str:
    """A did-you-mean for a value of the wrong type that reads as the right one (``"False"``, ``"1,2"``, ``3.0``)."""
    text = str(value).strip()
    if kind == "bool" and text.lower() in ("true", "false", "1", "0", "yes", "no"):
        return f" (did you mean {text.lower() in ('true', '1', 'yes')}?)"
    if kind in ("int", "ints") and isinstance(value, str):
        parts = [p.strip() for p in text.strip("[]()").split(",") if p.strip()]
        if parts and all(p.lstrip("-").isdigit() for p in parts):
            numbers = [int(p) for p in parts]
            return f" (did you mean {numbers[0] if len(numbers) == 1 else numbers}?)"
    if kind in ("int", "ints") and isinstance(value, float) and value.is_integer():
        return f" (did you mean {int(value)}?)"
    return ""


def _check_types(where: str, d: dict[str, Any], kinds: dict[str, str]) -> None:
    """Raise a ``SuiteError`` for every value of ``d`` whose type is not ``kinds[key]``, naming the key, the value
    given, its type and the type expected (with a did-you-mean when the value reads as a valid one). Without it,
    ``eval_only="False"`` is truthy and silently skips training, and ``seeds="1,2"`` ends in a traceback."""
    wrong = [key for key, kind in kinds.items() if key in d and not _fits(d[key], kind)]
    if wrong:
        raise SuiteError([f"{where}: {key!r} = {d[key]!r} ({type(d[key]).__name__}){_fix_for(d[key], kinds[key])}; "
                          f"expected {_EXPECTED[kinds[key]]}" for key in wrong])


@dataclass
class Grid:
    """A grid search over config keys.

    Args:
        params: config key -> list of values, e.g. ``{"TRAINER.SKIP.START_LAYER": [2, 4, 6]}``.
            ``DATASET.NUM_SHOTS`` sets the job's shots (and its ``shots{K}`` folder).
        mode: ``product`` (every combination) or ``zip`` (the i-th value of every key together).
    """

    params: dict[str, list[Any]] = field(metadata={"help": "config key -> values"})
    mode: str = field(default="product", metadata={"help": "product | zip"})

    def __post_init__(self) -> None:
        _check_types("grid", {"params": self.params, "mode": self.mode}, {"params": "dict", "mode": "str"})
        if self.mode not in GRID_MODES:
            raise SuiteError(f"grid mode {self.mode!r}; choose one of {', '.join(GRID_MODES)}")
        if not self.params:
            raise SuiteError("grid: 'params' is empty; give at least one config key with a list of values")
        self.params = {str(k): _as_list(v) for k, v in self.params.items()}
        lengths = {k: len(v) for k, v in self.params.items()}
        if any(n == 0 for n in lengths.values()):
            raise SuiteError(f"grid: every key needs at least one value; got {lengths}")
        if self.mode == "zip" and len(set(lengths.values())) > 1:
            raise SuiteError(f"grid mode 'zip' needs lists of equal length; got {lengths}")

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as ``{key: value}``, in order."""
        keys = list(self.params)
        combos = (zip(*self.params.values()) if self.mode == "zip"
                  else itertools.product(*self.params.values()))
        return [dict(zip(keys, values)) for values in combos]


@dataclass
class Task:
    """One trainer × config × protocol over datasets, seeds, shots and grid points.

    Args:
        name: the task's name in the experiment file.
        trainer: registered trainer name (CoOp, ZeroshotCLIP, ...).
        config: a yaml under ``configs/trainers/<trainer>/`` (name without .yaml) or a path to a yaml file.
        protocol: ``b2n`` (base-to-new), ``fewshot``, or ``xd`` (cross-dataset and domain generalisation).
        datasets: dataset names (``configs/datasets/<name>.yaml``); the targets for ``xd``.
        seeds: seeds to run.
        shots: shots per class (a list for few-shot curves).
        eval_only: nothing is trained (zero-shot CLIP).
        source: the training dataset of ``xd``.
        variants: the domain-generalisation targets of ``xd`` (ImageNet-V2/Sketch/A/R).
        opts: extra ``KEY VALUE`` config overrides for every job.
        grid: a ``Grid`` (or its dict) searched over.
    """

    name: str
    trainer: str
    config: str
    protocol: str
    datasets: list[str]
    seeds: list[int] = field(default_factory=lambda: [1])
    shots: list[int] = field(default_factory=lambda: [16])
    eval_only: bool = False
    source: str = ""
    variants: list[str] = field(default_factory=list)
    opts: list[str] = field(default_factory=list)
    grid: Grid | None = None
    config_file: str = field(default="", repr=False)  # resolved yaml path

    TYPES = {"trainer": "str", "config": "str", "protocol": "str", "datasets": "strs", "seeds": "ints",
             "shots": "ints", "eval_only": "bool", "source": "str", "variants": "strs", "opts": "opts"}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any], repo: str) -> Task:
        """Build and validate a task; raises one ``SuiteError`` listing every problem found."""
        where = f"task {name!r}"
        valid = [f.name for f in fields(cls) if f.name not in ("name", "config_file")]
        problems = Problems()
        with problems.check():
            _check_keys(where, d, valid)
        with problems.check():
            _check_types(where, d, cls.TYPES)
        for key in ("trainer", "config", "protocol", "datasets"):
            if key not in d:
                problems.add(f"{where}: missing key {key!r}")
        grid = d.get("grid")
        if grid is not None and not isinstance(grid, (dict, Grid)):
            problems.add(f"{where}: 'grid' = {grid!r} ({type(grid).__name__}); expected a dict(params="
                         "{KEY: [values]}, mode='product' | 'zip')")
        elif isinstance(grid, dict):
            grid_keys = [f.name for f in fields(Grid)]
            with problems.check():
                _check_keys(f"{where} grid", grid, grid_keys)
            with problems.check(f"{where}: "):
                if all(k in grid_keys for k in grid):
                    try:
                        grid = Grid(**grid)
                    except TypeError as e:
                        raise SuiteError(str(e)) from None
        problems.raise_if_any()  # the values below are only read once their types are right
        task = cls(name=name, trainer=d["trainer"], config=str(d["config"]), protocol=d["protocol"],
                   datasets=[str(x) for x in _as_list(d["datasets"])], seeds=[int(s) for s in
                                                                             _as_list(d.get("seeds", [1]))],
                   shots=[int(k) for k in _as_list(d.get("shots", [16]))], eval_only=bool(d.get("eval_only")),
                   source=str(d.get("source", "")), variants=[str(x) for x in _as_list(d.get("variants", []))],
                   opts=[str(x) for x in d.get("opts", [])], grid=grid)
        task.validate(repo)
        return task

    def validate(self, repo: str) -> None:
        """Check the values against the registries and ``configs/``; raises one ``SuiteError`` listing every problem
        (each unknown dataset on its own line)."""
        from vltune.registry import TRAINERS, RegistryError

        where = f"task {self.name!r}"
        problems = Problems()
        if self.protocol not in PROTOCOLS:
            problems.add(f"{where}: protocol {self.protocol!r}{_suggest(self.protocol, PROTOCOLS)}; choose one "
                         f"of {', '.join(PROTOCOLS)}")
        try:
            self.trainer = TRAINERS.canonical(self.trainer)
        except RegistryError as e:
            problems.add(f"{where}: {e.args[0]}")
        else:
            with problems.check():
                self.config_file = self._resolve_config(repo)
        if not self.datasets and self.protocol != "xd":
            problems.add(f"{where}: 'datasets' is empty")
        if self.protocol == "xd" and not self.source:
            problems.add(f"{where}: protocol 'xd' needs 'source' (the training dataset, e.g. 'imagenet')")
        if self.protocol != "xd" and (self.source or self.variants):
            problems.add(f"{where}: 'source' and 'variants' belong to protocol 'xd' only")
        names = [*self.datasets, *self.variants, *([self.source] if self.source else [])]
        known = dataset_names(repo)
        for d in names:
            if d not in known:
                problems.add(f"{where}: unknown dataset {d!r}{_suggest(d, known)}; datasets are the yaml files "
                             f"in configs/datasets/: {', '.join(known)}")
        if len(set(names)) != len(names):
            problems.add(f"{where}: a dataset is listed twice across source/datasets/variants: {names}")
        if not self.seeds:
            problems.add(f"{where}: 'seeds' is empty")
        if any(k < 0 for k in self.shots) or not self.shots:
            problems.add(f"{where}: 'shots' must be non-negative integers; got {self.shots}")
        if len(self.opts) % 2:
            problems.add(f"{where}: 'opts' must be KEY VALUE pairs; got an odd list {self.opts}")
        if self.grid and "DATASET.NUM_SHOTS" in self.grid.params and len(self.shots) > 1:
            problems.add(f"{where}: give the shots either in 'shots' or in the grid, not both")
        problems.raise_if_any()

    def _resolve_config(self, repo: str) -> str:
        if self.config.endswith((".yaml", ".yml")):
            path = os.path.abspath(os.path.expanduser(self.config))
            if not os.path.isfile(path):
                raise SuiteError(f"task {self.name!r}: config file {path} not found")
            return path
        folder = os.path.join(repo, "configs", "trainers", self.trainer)
        path = os.path.join(folder, f"{self.config}.yaml")
        if not os.path.isfile(path):
            choices = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(
                folder) else []
            raise SuiteError(f"task {self.name!r}: trainer config {self.config!r} not found in {folder}"
                             f"{_suggest(self.config, choices)}; choices: {', '.join(choices) or 'none'}")
        return path

    @property
    def config_name(self) -> str:
        return os.path.splitext(os.path.basename(self.config_file or self.config))[0]


@dataclass
class Stage:
    """One pipeline entry: its tasks run in order on its GPU group.

    Args:
        gpu_ids: GPUs of this group (indices of the GPUs the runner sees); ``[]`` runs on the CPU.
        tasks: task names, in order.
        slots_per_gpu: jobs per GPU at once (default: ``base["slots_per_gpu"]``).
    """

    gpu_ids: list[int]
    tasks: list[str]
    slots_per_gpu: int = 0


@dataclass
class Base:
    """Settings shared by every task.

    Args:
        data_root: the datasets' parent folder (CoOp layout).
        output_root: where job folders, tables, plots and report.md go.
        backbone: CLIP architecture (``MODEL.BACKBONE.NAME``).
        weights: local CLIP checkpoint (``MODEL.BACKBONE.WEIGHTS``); empty for an architecture's own default.
        pretrained: an open_clip pretrained tag (``MODEL.BACKBONE.PRETRAINED``) instead of ``weights``.
        prepare: ``"minibench"`` generates the MiniBench data and mini CLIP when missing.
        slots_per_gpu: jobs per GPU at once (or on the CPU when a pipeline has no GPUs).
        mail: the ``mail`` dict (vltune.notify.MailSettings); off by default.
        executor: ``ExecutorSettings``: ``local`` (default; ``warm``), ``ray`` with its ``address`` and
            ``max_retries``, or ``slurm`` with its sbatch settings.
        schedule: ``ScheduleSettings``: fixed slots (default) or memory-aware packing.
    """

    data_root: str
    output_root: str
    backbone: str
    weights: str = ""
    pretrained: str = ""
    prepare: str = ""
    slots_per_gpu: int = 1
    mail: Any = None
    executor: ExecutorSettings = field(default_factory=lambda: ExecutorSettings())
    schedule: ScheduleSettings = field(default_factory=lambda: ScheduleSettings())

    KEYS = ("data", "model", "output", "prepare", "slots_per_gpu", "mail", "executor", "schedule")

    @classmethod
    def from_dict(cls, d: dict[str, Any], folder: str, repo: str) -> Base:
        """Build and validate the base; raises one ``SuiteError`` listing every problem found."""
        from vltune.notify import MailSettings

        problems = Problems()
        with problems.check():
            _check_keys("base", d, cls.KEYS)
        with problems.check():
            _check_types("base", d, {"prepare": "str", "slots_per_gpu": "int"})
        sections = {"data": ("root",), "model": ("backbone", "weights", "pretrained"), "output": ("root",)}
        for key, keys in sections.items():
            if not isinstance(d.get(key), dict):
                problems.add(f"base[{key!r}] is missing; e.g. base = dict(data=dict(root='data'), "
                             "model=dict(backbone='ViT-B/16', weights='...'), output=dict(root='output'))")
                continue
            with problems.check():
                _check_keys(f"base[{key!r}]", d[key], keys)
            with problems.check():
                _check_types(f"base[{key!r}]", d[key], dict.fromkeys(keys, "str"))
        if isinstance(d.get("prepare", ""), str) and d.get("prepare", "") not in PREPARE:
            problems.add(f"base['prepare'] = {d['prepare']!r}; choose one of {PREPARE}")
        mail = executor = schedule = None
        try:
            mail = MailSettings.from_dict(d.get("mail"), repo)
        except ValueError as e:
            problems.add(str(e))
        with problems.check():
            executor = ExecutorSettings.from_dict(d.get("executor") or {})
        with problems.check():
            schedule = ScheduleSettings.from_dict(d.get("schedule") or {})
        problems.raise_if_any()  # the values below are only read once their types are right
        base = cls(data_root=resolve_path(folder, d["data"].get("root", "")),
                   output_root=resolve_path(folder, d["output"].get("root", "")),
                   backbone=str(d["model"].get("backbone", "")),
                   weights=resolve_path(folder, d["model"].get("weights", "")),
                   pretrained=str(d["model"].get("pretrained", "")), prepare=d.get("prepare", ""),
                   slots_per_gpu=int(d.get("slots_per_gpu", 1)), mail=mail, executor=executor, schedule=schedule)
        if not base.output_root or not base.backbone:
            problems.add("base: output.root and model.backbone must be set")
        if base.slots_per_gpu < 1:
            problems.add(f"base['slots_per_gpu'] = {base.slots_per_gpu}; it must be at least 1")
        problems.raise_if_any()
        return base


def resolve_path(folder: str, p: str) -> str:
    """A configs.py path: ``~`` expanded, relative ones taken from ``folder`` (the file's own); "" stays ""."""
    return os.path.normpath(os.path.join(folder, os.path.expanduser(p))) if p else ""


@dataclass
class ExecutorSettings:
    """Where jobs run: ``local`` (child processes on this machine), ``ray`` (tasks on a Ray cluster) or ``slurm``
    (SLURM jobs, submitted through submitit; see ``vltune.runner.slurm_executor``).

    Args:
        kind: ``local``, ``ray`` or ``slurm``.
        address: the Ray cluster (``auto``: the one ``ray start`` started on this machine; ``ray://host:10001``).
        max_retries: how often Ray re-runs a job whose worker or node died before it is recorded failed.
        warm: ``local`` only: fork each job from a warm worker that has imported torch, open_clip and vltune once
            (True), or start a fresh interpreter per job (False; the runner's ``--cold``).
        partition, account: ``slurm``: sbatch ``--partition`` / ``--account`` ("": the cluster's default).
        time: ``slurm``: each job's time limit, minutes or ``"D-HH:MM:SS"``.
        gpus_per_job: ``slurm``: GPUs per job (``--gres=gpu:N``; 0 on a CPU cluster).
        cpus_per_task: ``slurm``: ``--cpus-per-task`` (None: the cluster's default), also the job's OMP threads.
        mem_gb: ``slurm``: ``--mem`` per job (None: the cluster's default).
        array_parallelism: ``slurm``: how many jobs of one pipeline stage may be queued or running at once.
        requeue: ``slurm``: ``--requeue``: a preempted job is queued again and resumes from its last checkpoint.
        additional_parameters: ``slurm``: more sbatch options, e.g. ``{"qos": "high", "constraint": "a100"}``.
        poll_s: ``slurm``: how often the driver asks ``squeue`` about its jobs (one call for all of them).
    """

    kind: str = "local"
    address: str = "auto"
    max_retries: int = 2
    warm: bool = True
    partition: str = ""
    account: str = ""
    time: int | str = 60
    gpus_per_job: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 8
    requeue: bool = True
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    poll_s: float = 2.0

    KINDS = ("local", "ray", "slurm")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExecutorSettings:
        where = "base['executor']"
        problems = _settings_problems(cls, where, d, "dict(kind='local' | 'ray' | 'slurm', ...)", {
            "kind": "str", "address": "str", "max_retries": "int", "warm": "bool", "partition": "str",
            "account": "str", "gpus_per_job": "int", "array_parallelism": "int", "requeue": "bool",
            "additional_parameters": "dict"})
        if "time" in d and not (_is_int(d["time"]) or isinstance(d["time"], str)):
            problems.add(f"{where}: 'time' = {d['time']!r}; expected minutes (an integer) or 'D-HH:MM:SS'")
        if d.get("cpus_per_task") is not None and not _is_int(d["cpus_per_task"]):
            problems.add(f"{where}: 'cpus_per_task' = {d['cpus_per_task']!r}; expected an integer or None")
        for key in ("mem_gb", "poll_s"):
            if d.get(key) is not None and not _is_number(d[key]):
                problems.add(f"{where}: {key!r} = {d[key]!r}; expected a number")
        problems.raise_if_any()
        settings = cls(**d)
        if settings.kind not in cls.KINDS:
            problems.add(f"{where}['kind'] = {settings.kind!r}{_suggest(settings.kind, cls.KINDS)}; choose one of "
                         f"{cls.KINDS}")
        if settings.max_retries < 0:
            problems.add(f"{where}['max_retries'] = {settings.max_retries}; it must be >= 0")
        for key in ("gpus_per_job", "cpus_per_task", "mem_gb", "array_parallelism", "poll_s"):
            value, least = getattr(settings, key), 0 if key == "gpus_per_job" else 1e-9
            if value is not None and value < least:
                problems.add(f"{where}[{key!r}] = {value}; it must be {'>= 0' if least == 0 else '> 0'}")
        problems.raise_if_any()
        return settings


def _settings_problems(cls: type, where: str, d: Any, shape: str, types: dict[str, str]) -> Problems:
    """The first checks of a settings dict (``base['executor']``, ``base['schedule']``): a dict (else raise at once,
    naming ``shape``), with only ``cls``'s fields as keys and values of ``types``; returns the problems found."""
    if not isinstance(d, dict):
        raise SuiteError(f"{where} must be a {shape}, got {d!r}")
    problems = Problems()
    with problems.check():
        _check_keys(where, d, [f.name for f in fields(cls)])
    with problems.check():
        _check_types(where, d, types)
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ScheduleSettings:
    """How jobs share a device: ``base["schedule"]`` (see ``vltune.runner.packing``).

    Args:
        packing: ``slots`` (default: ``slots_per_gpu`` jobs per device) or ``memory`` (a job starts when its expected
            peak memory fits under the device's budget).
        gpu_memory_gb: memory per device; None reads each GPU's total memory (required when a stage runs on the CPU).
        headroom: fraction of the memory kept free (the budget is ``(1 - headroom) * gpu_memory``).
        default_gb: a job's expected peak when no finished run of its key exists and no probe measured it.
        process_overhead_gb: added to every estimate: a process's CUDA context and the allocator's cached blocks,
            which the measured tensor peak does not count.
        probe: measure an unknown key's peak with a short probe process before its first job (False: the default).
        max_jobs_per_device: also cap the jobs per device (None: memory alone decides).
    """

    packing: str = "slots"
    gpu_memory_gb: float | None = None
    headroom: float = 0.1
    default_gb: float = 4.0
    process_overhead_gb: float = 0.5
    probe: bool = True
    max_jobs_per_device: int | None = None

    PACKINGS = ("slots", "memory")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScheduleSettings:
        where = "base['schedule']"
        problems = _settings_problems(cls, where, d, "dict(packing='slots' | 'memory', ...)",
                                      {"packing": "str", "probe": "bool"})
        for key in ("gpu_memory_gb", "headroom", "default_gb", "process_overhead_gb"):
            if key in d and not _is_number(d[key]) and not (key == "gpu_memory_gb" and d[key] is None):
                problems.add(f"{where}: {key!r} = {d[key]!r} ({type(d[key]).__name__}){_fix_for(d[key], 'int')}; "
                             "expected a number" + (" or None" if key == "gpu_memory_gb" else ""))
        if d.get("max_jobs_per_device") is not None and not _is_int(d["max_jobs_per_device"]):
            problems.add(f"{where}: 'max_jobs_per_device' = {d['max_jobs_per_device']!r}; expected an integer or "
                         "None")
        packing = d.get("packing", cls.packing)
        if isinstance(packing, str) and packing not in cls.PACKINGS:
            problems.add(f"{where}['packing'] = {packing!r}{_suggest(packing, cls.PACKINGS)}; choose one of "
                         f"{', '.join(cls.PACKINGS)}")
        problems.raise_if_any()
        settings = cls(**d)
        if settings.gpu_memory_gb is not None and settings.gpu_memory_gb <= 0:
            problems.add(f"{where}['gpu_memory_gb'] = {settings.gpu_memory_gb}; it must be > 0 (or None: each "
                         "GPU's total memory)")
        if not 0 <= settings.headroom < 1:
            problems.add(f"{where}['headroom'] = {settings.headroom}; it is the fraction kept free, in [0, 1)")
        if settings.default_gb <= 0:
            problems.add(f"{where}['default_gb'] = {settings.default_gb}; it must be > 0")
        if settings.process_overhead_gb < 0:
            problems.add(f"{where}['process_overhead_gb'] = {settings.process_overhead_gb}; it must be >= 0")
        if settings.max_jobs_per_device is not None and settings.max_jobs_per_device < 1:
            problems.add(f"{where}['max_jobs_per_device'] = {settings.max_jobs_per_device}; it must be >= 1")
        problems.raise_if_any()
        return settings


@dataclass
class Experiments:
    """A validated experiment file; ``seed`` holds what only a Skip Tuning-format file has (its result and cost
    folders, ``remove_dirs``, grid plot kinds; see ``seed_configs.SeedSuite``), None for vltune's format."""

    path: str
    base: Base
    tasks: dict[str, Task]
    pipeline: list[Stage]
    seed: Any = None

    def stage_of(self, task: str) -> Stage:
        return next(s for s in self.pipeline if task in s.tasks)


def dataset_names(repo: str) -> list[str]:
    """The dataset names a task may use: the yaml files in ``configs/datasets/``."""
    folder = os.path.join(repo, "configs", "datasets")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def available_gpus() -> list[int]:
    """Indices of the GPUs this process sees (none on a CPU-only machine)."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _read_module(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise SuiteError(f"experiment file not found: {path}")
    spec = importlib.util.spec_from_file_location("vltune_experiments", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SuiteError as e:  # the file itself found a mistake (e.g. a preset's VLTUNE_* setting) and names it
        raise SuiteError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001  (any error in the user's file is reported with its name)
        raise SuiteError(f"{path} failed to load: {type(e).__name__}: {e}") from e
    return {k: getattr(module, k) for k in dir(module) if not k.startswith("_")}


def load_experiments(path: str, repo: str, gpus: Sequence[int] | None = None, slots_per_gpu: int = 0,
                     overrides: dict[str, Any] | None = None, executor: str | None = None) -> Experiments:
    """Read and validate an experiment file: vltune's format, or the Skip Tuning repository's (translated by
    ``seed_configs``, then validated and expanded exactly like vltune's).

    Args:
        path: the experiment file (``configs.py``).
        repo: the repository root (``configs/`` lives there).
        gpus: replace every pipeline's ``gpu_ids`` (``--gpus``); they must exist on this machine.
        slots_per_gpu: replace every stage's slots (``--slots-per-gpu``); 0 keeps the file's.
        overrides: replace entries of ``base`` before validation (tests: another data or output folder).
        executor: the executor kind chosen on the command line (``--executor``), over ``base['executor']``; with
            ``slurm`` the GPU ids are not checked against this machine's (SLURM gives each job its GPUs).

    Raises:
        SuiteError: listing every problem of the file (base, each pipeline entry, each task, the GPUs) at once.
    """
    from vltune.runner import seed_configs

    path = os.path.abspath(path)
    names = _read_module(path)
    for key in ("base", "pipeline"):
        if key not in names:
            raise SuiteError(f"{path}: no {key!r} defined; an experiment file defines base, its tasks and pipeline")
    problems = Problems()
    seed = None
    if seed_configs.is_seed_format(names):
        translated = seed_configs.translate(names, path, repo)
        names, seed = translated.names, translated.suite
        problems.items += translated.problems
    base = None
    with problems.check():
        base = Base.from_dict({**names["base"], **(overrides or {})}, os.path.dirname(path), repo)
    if seed is not None and base is not None:
        with problems.check():
            seed.check_inside(base.output_root)
    task_dicts = {k: v for k, v in names.items() if isinstance(v, dict) and "trainer" in v}
    not_validated = seed.not_validated if seed is not None else set()
    stages, seen = _stages(names["pipeline"], {*task_dicts, *not_validated}, problems, gpus,
                           slots_per_gpu or 0, base.slots_per_gpu if base else 1)
    kind = executor or (base.executor.kind if base is not None else "local")
    with problems.check():
        if kind != "slurm":
            check_gpus([g for s in stages for g in s.gpu_ids],
                       available_gpus() if any(s.gpu_ids for s in stages) else [])
    if base is not None and base.schedule.packing == "memory" and base.schedule.gpu_memory_gb is None and any(
            not s.gpu_ids for s in stages):
        problems.add("base['schedule']: packing='memory' on the CPU (a stage with gpu_ids=[] or --gpus cpu) needs "
                     "'gpu_memory_gb', the memory budget per device in GB (there is no GPU to read it from)")
    tasks = {}
    for name in seen:
        if name in not_validated:
            continue
        with problems.check():
            tasks[name] = Task.from_dict(name, task_dicts[name], repo)
    if not seen and not problems.items:
        problems.add("the pipeline has no tasks")
    problems.raise_if_any(path)
    return Experiments(path=path, base=base, tasks=tasks, pipeline=stages, seed=seed)


def _stages(pipeline: Any, defined: set[str], problems: Problems, gpus: Sequence[int] | None, slots_override: int,
            base_slots: int) -> tuple[list[Stage], dict[str, int]]:
    """The pipeline's stages and, for each task named, its stage index; every problem goes to ``problems``."""
    stages: list[Stage] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(_as_list(pipeline)):
        where = f"pipeline[{i}]"
        if not isinstance(raw, dict):
            problems.add(f"{where} must be a dict(gpu_ids=[...], tasks=[...])")
            continue
        before = len(problems.items)
        with problems.check():
            _check_keys(where, raw, [f.name for f in fields(Stage)])
        with problems.check():
            _check_types(where, raw, {"gpu_ids": "ints", "tasks": "strs", "slots_per_gpu": "int"})
        if len(problems.items) > before:
            continue
        stage = Stage(gpu_ids=[int(g) for g in _as_list(raw.get("gpu_ids", []))],
                      tasks=[str(t) for t in _as_list(raw.get("tasks", []))],
                      slots_per_gpu=int(slots_override or raw.get("slots_per_gpu", 0) or base_slots))
        for t in stage.tasks:
            if t not in defined:
                problems.add(f"{where}: unknown task {t!r}{_suggest(t, defined)}; tasks defined: "
                             f"{', '.join(sorted(defined)) or 'none'}")
            elif t in seen:
                problems.add(f"{where}: task {t!r} is already in pipeline[{seen[t]}]; a task runs in one stage")
            else:
                seen[t] = i
        if gpus is not None:
            stage.gpu_ids = list(gpus)
        if stage.slots_per_gpu < 1:
            problems.add(f"{where}: slots_per_gpu must be at least 1")
        stages.append(stage)
    return stages, seen


def check_gpus(wanted: Iterable[int], available: Sequence[int]) -> None:
    """Fail on every GPU id this machine does not have (each once), naming the valid ones."""
    have = ", ".join(map(str, available)) if available else "none (no CUDA GPU is visible)"
    missing = [g for g in dict.fromkeys(wanted) if g not in available]
    if missing:
        raise SuiteError([f"GPU id {g} does not exist; valid GPU ids: {have}. Use gpu_ids=[] to run on the CPU, or "
                          "--gpus to choose others" for g in missing])
