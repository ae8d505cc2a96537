"""The Skip Tuning repository's ``configs.py`` (Koorye/SkipTuning), translated into vltune's experiment format.

That format (dassl_contract.md §11) has a ``base`` dict with ``data``, ``train``, ``grid_search``, ``output`` and
``mail``; every task is a dict deep-merged over ``base`` (dicts merge, everything else overrides: its
``get_pipeline()`` does it with ``deepmerge``); ``pipeline`` lists ``dict(gpu_ids, tasks=[names])``. ``translate``
turns such a file into vltune's ``base``, task dicts and pipeline, which ``schema.load_experiments`` then validates
and ``jobs.expand`` expands like any vltune file: one code path after the translation. Mapping:

* ``train.mode`` ``b2n`` → protocol ``b2n`` over ``data.datasets_base_to_new``; ``all`` → ``fewshot`` over
  ``data.datasets_all``; ``xd`` → ``xd`` with source ``imagenet`` (upstream's fixed training set; ``train.source``
  overrides it) and ``data.datasets_cross_dataset`` split into targets and domain-generalisation ``variants`` (the
  datasets that are a domain-shifted test set of another: ImageNet-V2/Sketch/A/R).
* ``train.trainer``, ``cfg`` (the config name), ``seeds``, ``shots``, ``opts`` → the task's trainer, config, seeds,
  shots, opts. ``loadep`` must be -1 (vltune's evaluations load the last epoch); a non-empty ``load_from`` (upstream
  copies an earlier run's folder tree in) has no vltune equivalent and is an error saying what to do instead.
* ``grid_search.params`` (``name``/``alias``/``values``) → the task's grid (``name`` → ``values``); ``mode``
  ``sequential`` → ``zip``, ``grid`` → ``product``; ``DATASET.NUM_SHOTS`` there sets the shots as in vltune.
  ``plot`` (``line``/``col``/``heat``) is checked and recorded: vltune draws every grid search as a line plot.
* ``output.root`` → vltune's output root (tasks in ``<root>/<task>``, as upstream); ``output.result`` and ``cost``
  receive each task's accuracy and cost tables in ``<result>/<task>`` and ``<cost>/<task>``; ``remove_dirs``
  (upstream: names of those three keys, emptied before the task runs) is honoured only inside the output root.
* ``mail``: ``username``, ``host``, ``to`` → vltune's ``MailSettings`` (``user``, ``host``, ``to``), on by default as
  upstream; any ``MailSettings`` key is accepted too. A ``password`` is refused: the secret never goes in configs.py.
* The file has no model: the backbone comes from the tasks' trainer yamls (``MODEL.BACKBONE.NAME``), the weights from
  the default search. vltune's own ``model``, ``prepare``, ``slots_per_gpu`` and ``executor`` keys may be added to
  ``base`` as an extension (MiniBench needs ``model`` and ``prepare``).

Paths are relative to the configs.py folder, as everywhere in vltune (upstream: the working directory, which is the
repository holding configs.py).
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from deepmerge import Merger

from vltune.runner.schema import SuiteError, _check_keys, _check_types, _suggest, resolve_path

BASE_KEYS = ("data", "mail", "train", "grid_search", "output")
#: vltune's base keys a Skip Tuning base may carry too (one value for the whole suite)
EXTENSION_KEYS = ("model", "prepare", "slots_per_gpu", "executor")
DATA_KEYS = ("root", "datasets_base_to_new", "datasets_cross_dataset", "datasets_all")
TRAIN_KEYS = ("mode", "seeds", "load_from", "loadep", "shots", "opts", "trainer", "cfg", "source")
GRID_KEYS = ("plot", "mode", "params")
PARAM_KEYS = ("name", "alias", "values")
OUTPUT_KEYS = ("root", "result", "cost", "remove_dirs")
#: train.mode → (vltune protocol, the data key holding its datasets)
MODES = {"b2n": ("b2n", "datasets_base_to_new"), "xd": ("xd", "datasets_cross_dataset"),
         "all": ("fewshot", "datasets_all")}
GRID_MODES = {"sequential": "zip", "grid": "product"}
PLOTS = ("line", "col", "heat")
XD_SOURCE = "imagenet"  # upstream's parallel_runner trains every cross-dataset task on ImageNet
DG_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
OUTPUT_DIRS = ("root", "result", "cost")  # what a remove_dirs entry names upstream
PASSWORD_ENV = "VLTUNE_SMTP_PASSWORD"


@dataclass
class SeedTask:
    """What a Skip Tuning task has beyond vltune's task: where its tables go, what is emptied before it runs, and
    its grid plot kind.

    Args:
        name: the task.
        result_dir: ``<output.result>/<task>``: its accuracy tables ("" when ``output.result`` is not set).
        cost_dir: ``<output.cost>/<task>``: its cost table ("" when ``output.cost`` is not set).
        remove_dirs: the folders emptied before it runs (absolute), each with the entry that named it.
        plot: ``grid_search.plot``.
    """

    name: str
    result_dir: str = ""
    cost_dir: str = ""
    remove_dirs: list[tuple[str, str]] = field(default_factory=list)
    plot: str = "line"


@dataclass
class SeedSuite:
    """The Skip Tuning extras of a loaded file: one ``SeedTask`` per translated task; ``not_validated``: tasks the
    file defines that vltune does not validate: those whose translation failed (their problems are already reported)
    and those no pipeline entry names (they only feed the pipeline's did-you-mean)."""

    tasks: dict[str, SeedTask] = field(default_factory=dict)
    not_validated: set[str] = field(default_factory=set)

    def _selected(self, only: Iterable[str] | None) -> list[SeedTask]:
        return [t for name, t in self.tasks.items() if only is None or name in only]

    def check_inside(self, output_root: str) -> None:
        """Refuse every ``remove_dirs`` folder that is not strictly inside ``output_root`` (symlinks resolved)."""
        problems = [f"task {t.name!r}: output.remove_dirs entry {entry!r} is {path}, not inside the output root "
                    f"{output_root}; remove_dirs only empties folders inside output.root (put output.result/cost "
                    "under output.root, or drop the entry)"
                    for t in self.tasks.values() for entry, path in t.remove_dirs if not _inside(path, output_root)]
        if problems:
            raise SuiteError(problems)

    def plan(self, output_root: str, only: Iterable[str] | None = None) -> list[str]:
        """Lines for ``--dry-run``: the folders a run would empty, where the tables go, the recorded plot kinds."""
        lines = []
        for t in self._selected(only):
            lines += [f"task {t.name}: would remove {path} (remove_dirs {entry!r})" for entry, path in t.remove_dirs]
            lines += [f"task {t.name}: {what} tables -> {d}" for what, d in (("accuracy", t.result_dir),
                                                                             ("cost", t.cost_dir)) if d]
            if t.plot != "line":
                lines.append(plot_note(t))
        return lines

    def clear(self, output_root: str, only: Iterable[str] | None = None, echo: Callable[[str], Any] = print) -> None:
        """Empty the ``remove_dirs`` of the selected tasks before they run (upstream deletes and recreates them),
        printing each; a folder that is not inside ``output_root`` now (a symlink changed since loading) is kept."""
        for t in self._selected(only):
            for entry, path in t.remove_dirs:
                if not _inside(path, output_root):
                    raise SuiteError(f"task {t.name!r}: remove_dirs {entry!r} ({path}) now resolves outside the "
                                     f"output root {output_root}; nothing was removed")
                echo(f"Removing directory {path} (remove_dirs {entry!r} of task {t.name})")
                if os.path.lexists(path):
                    shutil.rmtree(path)
                os.makedirs(path, exist_ok=True)

    def write_tables(self, root: str, only: Iterable[str] | None = None) -> list[str]:
        """Write each task's accuracy tables (and its grid plot) into its result folder and its cost table into its
        cost folder, from the records under ``root``; returns the paths written."""
        from vltune.fileio import atomic_write
        from vltune.results.compare import compare_cost, find_methods, task_groups
        from vltune.results.formats import slug
        from vltune.results.record import find_records
        from vltune.results.tables import task_tables

        methods = find_methods(find_records(root))
        written = []

        def write(folder: str, table: Any) -> None:
            for ext, text in (("csv", table.to_csv()), ("tex", table.to_latex())):
                path = os.path.join(folder, f"{table.name}.{ext}")
                atomic_write(path, text.encode())
                written.append(path)

        for t in self._selected(only):
            mine = [m for m in methods if m.task == t.name]
            if not mine:
                continue
            if t.result_dir:
                for group in task_groups(mine):
                    summary, per_point = task_tables(group.name, group.points)
                    for table in [*(x for tables in per_point.values() for x in tables), *filter(None, [summary])]:
                        write(t.result_dir, table)
                plot = os.path.join(root, "plots", f"grid_{slug(t.name)}.png")
                if os.path.isfile(plot):
                    os.makedirs(t.result_dir, exist_ok=True)
                    written.append(shutil.copy2(plot, t.result_dir))
            cost = compare_cost(mine)
            if t.cost_dir and cost is not None:
                cost.name = f"{slug(t.name)}.cost"
                write(t.cost_dir, cost)
        return written


def plot_note(t: SeedTask) -> str:
    return (f"task {t.name}: grid_search.plot {t.plot!r} is recorded; vltune draws grid searches as a line plot "
            f"(plots/grid_{t.name}.png)")


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` lies strictly inside ``root`` once symlinks are resolved (the root itself is not inside)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real != top and os.path.commonpath([real, top]) == top


@dataclass
class Translation:
    """``names``: the file in vltune's format (``base``, ``pipeline``, one task dict per task); ``suite``: the Skip
    Tuning extras; ``problems``: every mistake found while translating."""

    names: dict[str, Any]
    suite: SeedSuite
    problems: list[str]


def is_seed_format(names: dict[str, Any]) -> bool:
    """A Skip Tuning configs.py: its ``base`` has ``train`` or ``grid_search`` (keys vltune's base never has)."""
    base = names.get("base")
    return isinstance(base, dict) and ("train" in base or "grid_search" in base)


#: upstream's merge of a task over ``base`` (its ``get_pipeline``): dicts merge, lists, sets and anything else override
MERGER = Merger([(list, ["override"]), (dict, ["merge"]), (set, ["override"])], ["override"], ["override"])


def _is_secret(key: Any) -> bool:
    from vltune.notify.mail import SECRET_KEYS, MailSettings

    low = str(key).lower()
    valid = {f for f in MailSettings.__dataclass_fields__}
    return low not in valid and (low in SECRET_KEYS or any(w in low for w in ("password", "passwd", "secret")))


def _password_problems(where: str, mail: Any) -> list[str]:
    if not isinstance(mail, dict):
        return []
    return [f"{where}[{key!r}]: the SMTP password never goes in configs.py (it gets committed and shared); delete "
            f"it and export it in the environment variable {PASSWORD_ENV} (mail password_env), or put it on the "
            "first line of a file outside the repository named by mail password_file"
            for key in mail if _is_secret(key)]


def _mail(mail: dict[str, Any]) -> dict[str, Any]:
    """Upstream's mail dict as vltune's: ``username`` → ``user``, on unless ``enabled=False``; secrets dropped
    (they are reported)."""
    out = {"enabled": True, **{k: v for k, v in mail.items() if not _is_secret(k) and k != "username"}}
    if "username" in mail:
        out.setdefault("user", mail["username"])
    return out


def _checked(problems: list[str], check: Callable[[], None]) -> None:
    try:
        check()
    except SuiteError as e:
        problems += e.problems


def _is_variant(dataset: str, repo: str) -> bool:
    """Whether ``dataset`` is a domain-shifted test set of another (its class names one in ``variant_of``)."""
    import yaml

    from vltune.registry import DATASETS, RegistryError

    if dataset in DG_VARIANTS:
        return True
    path = os.path.join(repo, "configs", "datasets", f"{dataset}.yaml")
    if not os.path.isfile(path):
        return False  # the unknown dataset is reported by the task's validation
    with open(path) as f:
        name = ((yaml.safe_load(f) or {}).get("DATASET") or {}).get("NAME", "")
    try:
        return bool(getattr(DATASETS.get(name), "variant_of", ""))
    except RegistryError:
        return False


def _backbone(task: dict[str, Any], repo: str) -> str:
    """``MODEL.BACKBONE.NAME`` of a translated task's trainer yaml; "" when it cannot be read (reported elsewhere)."""
    import yaml

    from vltune.registry import TRAINERS, RegistryError

    config = str(task["config"])
    if config.endswith((".yaml", ".yml")):
        path = os.path.abspath(os.path.expanduser(config))
    else:
        try:
            path = os.path.join(repo, "configs", "trainers", TRAINERS.canonical(task["trainer"]), f"{config}.yaml")
        except RegistryError:
            return ""
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    return str(((cfg.get("MODEL") or {}).get("BACKBONE") or {}).get("NAME", ""))


def _merged_tasks(names: dict[str, Any], pipeline: list[Any], problems: list[str]) -> dict[str, dict[str, Any]]:
    """Every task the pipeline names, merged over ``base``: by the file's own ``get_pipeline()`` when it defines one
    (upstream's entry point), else by ``MERGER`` (the same deepmerge rules). Tasks that are not dicts of the file
    are left to the pipeline's unknown-task error."""
    wanted = [t for entry in pipeline if isinstance(entry, dict) for t in _listed(entry.get("tasks"))]
    defined = [t for t in dict.fromkeys(wanted) if isinstance(names.get(t), dict) and t not in ("base", "pipeline")]
    get_pipeline = names.get("get_pipeline")
    if callable(get_pipeline) and len(defined) == len(set(wanted)):
        try:
            merged = {t["name"]: t for pipe in get_pipeline() for t in pipe["tasks"]}
            return {t: merged[t] for t in defined}
        except Exception as e:  # noqa: BLE001  (the user's function: report, then merge as upstream does)
            problems.append(f"get_pipeline() failed ({type(e).__name__}: {e}); the tasks were merged over base "
                            "without it")
    return {t: MERGER.merge(copy.deepcopy(names["base"]), copy.deepcopy(names[t])) for t in defined}


def _listed(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _check_sections(where: str, d: dict[str, Any], problems: list[str]) -> None:
    """The keys of ``base`` or of one task as written (before merging, so a mistake of base is named once)."""
    _checked(problems, lambda: _check_keys(where, d, [*BASE_KEYS, *EXTENSION_KEYS]))
    for key, valid in (("data", DATA_KEYS), ("train", TRAIN_KEYS), ("grid_search", GRID_KEYS),
                       ("output", OUTPUT_KEYS)):
        value = d.get(key, {})
        if not isinstance(value, dict):
            problems.append(f"{where}: {key!r} = {value!r} ({type(value).__name__}); expected a dict")
        else:
            _checked(problems, lambda: _check_keys(f"{where}[{key!r}]", value, valid))


def _translate_task(name: str, t: dict[str, Any], base: dict[str, Any], folder: str,
                    repo: str) -> tuple[dict[str, Any], SeedTask, list[str]]:
    """One task merged over base as a vltune task dict and its ``SeedTask``; the problems found, each naming the
    task (its keys are checked by ``_check_sections``)."""
    where = f"task {name!r}"
    problems: list[str] = []
    for key in (*EXTENSION_KEYS, "mail"):
        if t.get(key) != base.get(key):
            problems.append(f"{where}: sets {key!r} differently from base; vltune runs a suite with one {key}: set "
                            "it in base only")
    sections = {key: t.get(key) if isinstance(t.get(key), dict) else {}
                for key in ("data", "train", "grid_search", "output")}
    data, train, grid, output = sections["data"], sections["train"], sections["grid_search"], sections["output"]
    for key, section in (("data", data), ("output", output)):
        if section.get("root") != (base.get(key) or {}).get("root"):
            problems.append(f"{where}: sets {key}.root differently from base; vltune runs a suite with one "
                            f"{key} root (each task in its own <root>/<task> folder, as upstream): set it in base")
    _checked(problems, lambda: _check_types(f"{where} train", train, {
        "mode": "str", "trainer": "str", "cfg": "str", "load_from": "str", "loadep": "int", "source": "str"}))
    _checked(problems, lambda: _check_types(f"{where} output", output, {
        "result": "str", "cost": "str", "remove_dirs": "strs"}))
    _checked(problems, lambda: _check_types(f"{where} grid_search", grid, {"plot": "str", "mode": "str"}))
    for key in ("trainer", "cfg"):
        if key not in train:
            problems.append(f"{where}: train.{key} is missing (e.g. train=dict(trainer='SkipTuning', "
                            "cfg='vit_b16_bs4'))")
    mode = train.get("mode", "b2n") if isinstance(train.get("mode", "b2n"), str) else "b2n"  # a type error is named
    if mode not in MODES:
        problems.append(f"{where}: train.mode {mode!r}{_suggest(str(mode), MODES)}; choose one of "
                        f"{', '.join(MODES)}")
    if train.get("load_from"):
        problems.append(f"{where}: train.load_from = {train['load_from']!r}: vltune does not copy an earlier run's "
                        "folders in (upstream's copytree); to start from a trained state put "
                        "['MODEL.INIT_WEIGHTS', '<checkpoint file>'] in train.opts; to reuse finished jobs point "
                        "output.root at the earlier run (finished jobs are not run again); then set load_from=''")
    if train.get("loadep", -1) != -1:
        problems.append(f"{where}: train.loadep = {train['loadep']!r}: vltune's evaluations load the last epoch "
                        "(-1); set loadep=-1 (and OPTIM.MAX_EPOCH in train.opts to train for that many epochs)")
    protocol, data_key = MODES.get(mode, ("b2n", "datasets_base_to_new"))
    if data_key not in data:
        problems.append(f"{where}: train.mode {mode!r} reads data.{data_key}, which is not set")
    datasets = data.get(data_key, [])
    task: dict[str, Any] = {"trainer": train.get("trainer"), "config": train.get("cfg"), "protocol": protocol,
                            "datasets": datasets, "seeds": train.get("seeds", [1]), "shots": train.get("shots", 16),
                            "opts": train.get("opts", [])}
    if protocol == "xd" and isinstance(datasets, (list, tuple)):
        task["source"] = train.get("source", XD_SOURCE)
        task["variants"] = [d for d in datasets if _is_variant(str(d), repo)]
        task["datasets"] = [d for d in datasets if d not in task["variants"]]
    grid_task = _grid(where, grid, problems)
    if grid_task:
        task["grid"] = grid_task
    plot = grid.get("plot", "line")
    if isinstance(plot, str) and plot not in PLOTS:
        problems.append(f"{where}: grid_search.plot {plot!r}{_suggest(plot, PLOTS)}; choose one of "
                        f"{', '.join(PLOTS)}")
    seed = SeedTask(name=name, plot=str(plot))
    for key, attr in (("result", "result_dir"), ("cost", "cost_dir")):
        if isinstance(output.get(key), str) and output[key]:
            setattr(seed, attr, os.path.join(resolve_path(folder, output[key]), name))
    outputs = {"root": os.path.join(resolve_path(folder, str(output.get("root", ""))), name),
               "result": seed.result_dir, "cost": seed.cost_dir}
    for entry in _listed(output.get("remove_dirs", [])):
        path = outputs.get(entry) if entry in OUTPUT_DIRS else resolve_path(folder, entry)
        if not path:
            problems.append(f"{where}: output.remove_dirs names {entry!r}, but output.{entry} is not set")
        else:
            seed.remove_dirs.append((entry, path))
    return task, seed, problems


def _grid(where: str, grid: dict[str, Any], problems: list[str]) -> dict[str, Any] | None:
    """``grid_search`` as a vltune grid dict (None without params); its problems go to ``problems``."""
    mode = grid.get("mode", "sequential") if isinstance(grid.get("mode", "sequential"), str) else "sequential"
    if mode not in GRID_MODES:
        problems.append(f"{where}: grid_search.mode {mode!r}{_suggest(mode, GRID_MODES)}; choose one of "
                        f"{', '.join(GRID_MODES)}")
    params = grid.get("params", [])
    if not isinstance(params, (list, tuple)):
        problems.append(f"{where}: grid_search.params = {params!r}; expected a list of dict(name=KEY, alias=..., "
                        "values=[...])")
        return None
    out: dict[str, Any] = {}
    for i, param in enumerate(params):
        at = f"{where}: grid_search.params[{i}]"
        if not isinstance(param, dict) or "name" not in param or "values" not in param:
            problems.append(f"{at} = {param!r}; expected dict(name=KEY, alias=SHORT, values=[...])")
            continue
        _checked(problems, lambda: _check_keys(at, param, PARAM_KEYS))
        _checked(problems, lambda: _check_types(at, param, {"name": "str", "alias": "str"}))
        if not isinstance(param["values"], (list, tuple)) or not param["values"]:
            problems.append(f"{at}: 'values' = {param['values']!r}; expected a non-empty list")
        elif param["name"] in out:
            problems.append(f"{at}: {param['name']!r} is searched twice")
        else:
            out[str(param["name"])] = list(param["values"])
    if not out:
        return None
    return {"params": out, "mode": GRID_MODES.get(mode, "zip")}


def translate(names: dict[str, Any], path: str, repo: str) -> Translation:
    """The Skip Tuning file ``names`` (its module's globals) in vltune's format, with every problem found.

    Args:
        names: the file's public globals (``base``, the task dicts, ``pipeline``, ``get_pipeline``).
        path: the file (relative paths are taken from its folder).
        repo: the repository root (``configs/``).
    """
    folder = os.path.dirname(path)
    base = names["base"]
    problems: list[str] = []
    _check_sections("base", base, problems)
    problems += _password_problems("base['mail']", base.get("mail"))
    vbase: dict[str, Any] = {key: base[key] for key in EXTENSION_KEYS if key in base}
    for key in ("data", "output"):
        section = base.get(key)
        vbase[key] = {"root": section.get("root", "")} if isinstance(section, dict) else section
    if isinstance(base.get("mail"), dict):
        vbase["mail"] = _mail(base["mail"])
    elif "mail" in base:
        vbase["mail"] = base["mail"]
    pipeline = names["pipeline"] if isinstance(names["pipeline"], (list, tuple)) else [names["pipeline"]]
    for t in dict.fromkeys(t for entry in pipeline if isinstance(entry, dict) for t in _listed(entry.get("tasks"))):
        if isinstance(names.get(t), dict):
            _check_sections(f"task {t!r}", names[t], problems)
            problems += _password_problems(f"task {t!r}['mail']", names[t].get("mail"))
    suite = SeedSuite()
    out: dict[str, Any] = {"pipeline": pipeline}
    for name, merged in _merged_tasks(names, pipeline, problems).items():
        task, seed, found = _translate_task(name, merged, base, folder, repo)
        problems += found
        if found or any(p.startswith(f"task {name!r}") for p in problems):
            suite.not_validated.add(name)
        else:
            out[name] = task
            suite.tasks[name] = seed
    suite.not_validated |= {k for k, v in names.items() if isinstance(v, dict) and "train" in v and k != "base"
                            and k not in out and k not in suite.tasks}
    if "model" not in base:
        backbones = {name: b for name, task in out.items() if name != "pipeline" and (b := _backbone(task, repo))}
        if len(set(backbones.values())) == 1:
            vbase["model"] = {"backbone": next(iter(backbones.values()))}
        elif backbones:
            problems.append(f"base: the tasks' trainer yamls name different backbones ({backbones}); vltune runs one "
                            "backbone per suite: add model=dict(backbone=..., weights=...) to base")
    out["base"] = vbase
    return Translation(names=out, suite=suite, problems=problems)
