"""Paper presets: the experiments of the papers as runner tasks (``presets/*.py`` are thin experiment files over this).

Which yaml each method uses per protocol is part of its registration (``vltune/registry.py``): ``presets`` gives the
configs (following methods.md §15; the configs' own headers cite their sources), ``no_preset`` the reason where a
protocol has none (what the papers and repositories define), ``eval_only`` marks the methods that never train. For
example ``TRAINERS.register("ProGrad", ..., presets=dict(b2n="vit_b16_ep100_ctx", xd="vit_b16_ep100_ctx"),
no_preset=dict(fewshot="ProGrad's official few-shot runs use RN50 ..."))``. ``methods()`` (also read as ``METHODS``),
``reasons()`` and ``eval_only_methods()`` (``EVAL_ONLY``) derive the table from the registry, so they see the
methods of every plugin package loaded (``vltune.plugins.load_builtins()``, ``VLTUNE_PLUGINS``). A preset leaves a
method out of a protocol it has no config for and prints the reason on stderr.

``experiment(protocol)`` builds the ``base``, the tasks and the ``pipeline`` of one benchmark from environment
variables, which the ``scripts/*.sh`` wrappers set:

=====================  ======================================================  =========================
variable               meaning                                                 default
=====================  ======================================================  =========================
VLTUNE_DATA            the data root (one folder per dataset, CoOp layout)     ``data``
VLTUNE_WEIGHTS         the CLIP weights file                                   search (``~/.cache/clip``)
VLTUNE_BACKBONE        MODEL.BACKBONE.NAME                                     ``ViT-B/16``
VLTUNE_OUTPUT          output root                                             ``output/<protocol>``
VLTUNE_GPUS            GPU ids, or ``cpu``                                     ``0``
VLTUNE_SLOTS           jobs at once per GPU                                    ``1``
VLTUNE_METHODS         methods (space separated)                               every method with a config
VLTUNE_SEEDS           seeds                                                   ``1 2 3``
VLTUNE_SHOTS           shots (few-shot: the curve; others: one value)          ``1 2 4 8 16`` / ``16``
VLTUNE_DATASETS        only these of the benchmark's datasets                  the benchmark's
VLTUNE_OPTS            extra ``KEY VALUE`` config overrides for every job      none
VLTUNE_SMOKE           1: the smoke run (``vltune.runner.smoke``)              0
=====================  ======================================================  =========================

Relative paths are taken from the working directory; the defaults ``data`` and ``output/<protocol>`` lie in the
repository root. An unknown name in VLTUNE_METHODS or VLTUNE_DATASETS fails with the closest names (a dataset of
vltune that is not one of this benchmark's says so). On the CPU (``VLTUNE_GPUS=cpu``) a job whose config resolves to
fp16, which needs CUDA, runs in amp (bf16 autocast) instead: its method's precision key (``TRAINER.<node>.PREC`` or
``TRAINER.PREC``) is set to amp after the other opts, and one line on stderr names the methods.

The Skip Tuning ablations read ``VLTUNE_START_LAYERS``, ``VLTUNE_TOP_RATIOS`` and ``VLTUNE_LAMBDAS`` (defaults: the
paper's ranges, methods.md §13.6).
"""

from __future__ import annotations

import difflib
import os
import shlex
import sys
from collections.abc import Mapping
from typing import Any

from vltune.plugins import HINT
from vltune.registry import PRESET_PROTOCOLS, TRAINERS
from vltune.runner import smoke as smoke_mode
from vltune.runner.schema import SuiteError, dataset_names

#: the 11 base-to-new / few-shot datasets (configs/datasets/<name>.yaml), in the papers' table order
BENCHMARK_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                      "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_SOURCE = "imagenet"
XD_TARGETS = BENCHMARK_DATASETS[1:]  # the 10 cross-dataset targets
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
SEEDS = [1, 2, 3]
FEWSHOT_SHOTS = [1, 2, 4, 8, 16]
PROTOCOLS = ("b2n", "fewshot", "xd", "dg", "ablation")
BENCHMARKS = {"b2n": "base-to-new", "fewshot": "few-shot", "xd": "cross-dataset", "dg": "domain generalisation",
              "ablation": "Skip Tuning ablation"}

#: the Skip Tuning ablations (base-to-new grid searches, methods.md §13.6)
ABLATIONS = {"start_layer": ("TRAINER.SKIP.START_LAYER", "VLTUNE_START_LAYERS", [2, 4, 6, 8, 10]),
             "top_ratio": ("TRAINER.SKIP.TOP_RATIO", "VLTUNE_TOP_RATIOS", [1.0, 0.9, 0.7, 0.5, 0.3, 0.1]),
             "lambda": ("TRAINER.SKIP.LAMBDA", "VLTUNE_LAMBDAS", [0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])}

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config_path(config: str) -> str:
    """A registered preset value as the runner takes it: a yaml name stays a name; a relative ``.yaml`` path is made
    absolute from the repository root (e.g. ZeroshotCLIP2 sharing ZeroshotCLIP's yaml)."""
    if config.endswith((".yaml", ".yml")):
        return os.path.join(_REPO, os.path.expanduser(config))  # an absolute path stays as it is
    return config


def methods() -> dict[str, dict[str, Any]]:
    """method → {protocol: config, or {shots: config} where the epochs depend on K; None: no preset (``reasons()``
    says why)}, for every registered trainer, from its registration's ``presets``. Order: the eval-only methods (the
    zero-shot baselines) first, as in the papers' tables, then registration order."""
    table: dict[str, dict[str, Any]] = {}
    eval_only = eval_only_methods()
    for name in sorted(TRAINERS.registered_names(), key=lambda n: n not in eval_only):
        given = TRAINERS.meta(name).get("presets") or {}
        table[name] = {}
        for protocol in PRESET_PROTOCOLS:
            entry = given.get(protocol)
            if isinstance(entry, Mapping):
                entry = {int(k): _config_path(v) for k, v in entry.items()}
            elif entry is not None:
                entry = _config_path(entry)
            table[name][protocol] = entry
    return table


def reasons() -> dict[str, dict[str, str]]:
    """method → {protocol: why the presets leave it out} for each protocol without a preset: the registration's
    ``no_preset`` reason, or a line saying the registration gives neither."""
    table: dict[str, dict[str, str]] = {}
    for name in TRAINERS.registered_names():
        meta = TRAINERS.meta(name)
        given, why = meta.get("presets") or {}, meta.get("no_preset") or {}
        table[name] = {p: why.get(p) or f"its registration gives neither presets[{p!r}] nor no_preset[{p!r}]"
                       for p in PRESET_PROTOCOLS if p not in given}
    return table


def eval_only_methods() -> set[str]:
    """The registered methods that never train (``eval_only=True``): their preset jobs are evaluations."""
    return {name for name in TRAINERS.registered_names() if TRAINERS.meta(name).get("eval_only")}


def __getattr__(name: str) -> Any:
    """``METHODS`` and ``EVAL_ONLY``, derived from the registry when read (it fills when the plugins load)."""
    if name == "METHODS":
        return methods()
    if name == "EVAL_ONLY":
        return eval_only_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _words(env: Mapping[str, str], key: str) -> list[str] | None:
    value = env.get(key, "").strip()
    return shlex.split(value) if value else None


def _numbers(words: list[str], key: str) -> list[float]:
    try:
        return [float(w) if "." in w else int(w) for w in words]
    except ValueError:
        raise ValueError(f"{key} takes numbers separated by spaces, got {' '.join(words)!r}") from None


def config_for(method: str, protocol: str, shots: int = 16,
               table: Mapping[str, Mapping[str, Any]] | None = None) -> str | None:
    """The yaml name (under configs/trainers/<method>/) or path a method uses for ``protocol`` (``dg`` uses
    ``xd``'s); None where it has none."""
    entry = (methods() if table is None else table)[method].get("xd" if protocol == "dg" else protocol)
    return entry.get(shots) if isinstance(entry, Mapping) else entry


def _gpus(env: Mapping[str, str]) -> list[int]:
    words = _words(env, "VLTUNE_GPUS") or ["0"]
    if words == ["cpu"]:
        return []
    return [int(n) for n in _numbers(words, "VLTUNE_GPUS")]


def _flag(env: Mapping[str, str], key: str) -> bool:
    value = env.get(key, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise SuiteError(f"{key} is {env[key]!r}; set it to 1 (on) or 0 (off)")


def _suggest(name: str, valid: list[str]) -> str:
    """`` (did you mean X?)`` by spelling, case ignored (``coop`` -> CoOp, ``oxford_pet`` -> oxford_pets)."""
    lower = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(lower[c] for c in close)}?)" if close else ""


def _methods(words: list[str], table: Mapping[str, Any]) -> list[str]:
    """The methods named in VLTUNE_METHODS (aliases resolved, e.g. FTCLIP); an unknown name fails with the closest
    registered names and the list of them."""
    chosen, errors = [], []
    for word in words:
        name = word if word in table else TRAINERS.canonical(word) if word in TRAINERS else None
        if name in table:
            chosen.append(name)
        else:
            errors.append(f"unknown method {word!r}{_suggest(word, list(table))}")
    if errors:
        raise SuiteError(f"VLTUNE_METHODS (--methods): {'; '.join(errors)}; methods: {', '.join(table)}")
    return list(dict.fromkeys(chosen))


def _datasets(words: list[str], protocol: str, smoke: bool) -> set[str]:
    """The datasets named in VLTUNE_DATASETS, checked against the benchmark's own (in smoke mode also their
    MiniBench stand-ins, to which the names are mapped). A name that is a dataset of vltune but not of this
    benchmark says so; any other gets the closest names."""
    valid = {"b2n": BENCHMARK_DATASETS, "fewshot": BENCHMARK_DATASETS, "ablation": BENCHMARK_DATASETS,
             "xd": [XD_SOURCE, *XD_TARGETS], "dg": [XD_SOURCE, *DG_TARGETS]}[protocol]
    if smoke:
        valid = list(dict.fromkeys([*valid, *(smoke_mode.standin(d) for d in valid)]))
    known = dataset_names(_REPO)
    errors = []
    for word in words:
        if word in valid:
            continue
        if word in known:
            errors.append(f"{word!r} is a dataset (configs/datasets/) but not part of the {BENCHMARKS[protocol]} "
                          "benchmark" + ("" if smoke or word not in smoke_mode.STANDINS.values() else
                                         " (MiniBench stand-ins need --smoke)"))
        else:
            errors.append(f"unknown dataset {word!r}{_suggest(word, valid) or _suggest(word, known)}")
    if errors:
        raise SuiteError(f"VLTUNE_DATASETS (--datasets): {'; '.join(errors)}; the {BENCHMARKS[protocol]} datasets: "
                         f"{', '.join(valid)}")
    return {smoke_mode.standin(w) if smoke else w for w in words}


def _base(protocol: str, env: Mapping[str, str]) -> dict[str, Any]:
    """``base`` of a real run; relative paths given in ``env`` are taken from the working directory, the defaults
    (``data``, ``output/<protocol>``) from the repository root."""
    weights = env.get("VLTUNE_WEIGHTS", "")
    return dict(data=dict(root=os.path.abspath(env.get("VLTUNE_DATA") or os.path.join(_REPO, "data"))),
                model=dict(backbone=env.get("VLTUNE_BACKBONE") or "ViT-B/16",
                           weights=os.path.abspath(os.path.expanduser(weights)) if weights else ""),
                output=dict(root=os.path.abspath(env.get("VLTUNE_OUTPUT") or os.path.join(_REPO, "output",
                                                                                          protocol))),
                slots_per_gpu=int(env.get("VLTUNE_SLOTS") or 1))


def _config_cfg(method: str, config: str, opts: list[str]) -> Any:
    """The merged config of ``method`` with ``config`` and ``opts`` (no dataset); None when the yaml is missing
    (the runner then names it)."""
    from vltune.config import get_cfg

    path = config if os.path.isabs(config) else os.path.join(_REPO, "configs", "trainers", method, f"{config}.yaml")
    if not os.path.isfile(path):
        return None
    return get_cfg(config_file=path, opts=["TRAINER.NAME", method, *opts])


def cpu_precision_opts(method: str, cfg: Any) -> list[str]:
    """``[KEY, "amp"]`` when ``cfg`` (a config of ``method``) resolves to fp16, which needs CUDA: amp autocasts to
    bf16 on a CPU. KEY is the key that decides the precision (``TRAINER.<node>.PREC`` or ``TRAINER.PREC``). A
    direct ``train.py`` run keeps the engine's error instead (vltune/engine/precision.py)."""
    from vltune.engine.precision import precision_setting

    key, mode = precision_setting(cfg, getattr(TRAINERS.get(method), "config_node", None))
    return [key, "amp"] if mode == "fp16" else []


def experiment(protocol: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``base``, one task per method (and config group) and ``pipeline`` for ``protocol``.

    Methods without a config for the protocol are left out with a line on stderr; an unknown method or dataset
    fails with the closest names. On the CPU (``VLTUNE_GPUS=cpu``) a config that resolves to fp16 runs in amp (bf16
    autocast), said once on stderr. ``VLTUNE_SMOKE=1``: the smoke run of ``vltune.runner.smoke``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown preset protocol {protocol!r}: choose from {', '.join(PROTOCOLS)}")
    env = os.environ if env is None else env
    smoke = _flag(env, "VLTUNE_SMOKE")
    base = smoke_mode.base(protocol, env) if smoke else _base(protocol, env)
    gpus = [] if smoke else _gpus(env)
    seeds = [int(s) for s in _numbers(_words(env, "VLTUNE_SEEDS") or
                                      [str(s) for s in (smoke_mode.SEEDS if smoke else SEEDS)], "VLTUNE_SEEDS")]
    given_shots = _words(env, "VLTUNE_SHOTS")
    default_shots = FEWSHOT_SHOTS if protocol == "fewshot" else [smoke_mode.SHOTS if smoke else 16]
    shots = [int(k) for k in _numbers(given_shots or [str(k) for k in default_shots], "VLTUNE_SHOTS")]
    user_opts = _words(env, "VLTUNE_OPTS") or []
    table, why, eval_only_set = methods(), reasons(), eval_only_methods()
    if not table:
        raise ValueError(f"no method is registered; {HINT}")
    words = _words(env, "VLTUNE_METHODS")
    chosen = _methods(words, table) if words else (["SkipTuning"] if protocol == "ablation" else list(table))
    words = _words(env, "VLTUNE_DATASETS") or (smoke_mode.DEFAULT_DATASETS[protocol] if smoke else None)
    only = _datasets(words, protocol, smoke) if words else None

    def pick(names: list[str]) -> list[str]:
        if smoke:
            names = list(dict.fromkeys(smoke_mode.standin(d) for d in names))
        return [d for d in names if d in only] if only else names

    amp: list[str] = []  # methods whose fp16 configs run in amp on the CPU

    def opts_for(method: str, config: str) -> list[str]:
        front = [*smoke_mode.run_opts(), *smoke_mode.tiny_clip_opts(method)] if smoke else []
        cfg = _config_cfg(method, config, [*front, *user_opts]) if smoke or not gpus else None
        if cfg is None:
            return [*front, *user_opts]
        front += smoke_mode.batch_opts(cfg) if smoke else []
        tail = cpu_precision_opts(method, cfg) if not gpus else []
        if tail and method not in amp:
            amp.append(method)
        return [*front, *user_opts, *tail]

    tasks: dict[str, dict[str, Any]] = {}
    for method in chosen:
        eval_only = method in eval_only_set
        if protocol == "ablation":
            config = config_for(method, "b2n", table=table)
            for name, (key, env_key, default) in ABLATIONS.items():
                default = smoke_mode.SMOKE_ABLATIONS[name] if smoke else default
                values = _numbers(_words(env, env_key) or [str(v) for v in default], env_key)
                tasks[f"{method.lower()}_ablation_{name}"] = dict(
                    trainer=method, config=config, protocol="b2n", datasets=pick(BENCHMARK_DATASETS),
                    shots=shots[:1], grid=dict(params={key: values}), seeds=seeds, opts=opts_for(method, config))
            continue
        groups: dict[str, list[int]] = {}
        for k in shots:
            config = config_for(method, protocol, k, table)
            if config is not None:
                groups.setdefault(config, []).append(k)
        if not groups:
            entry = "xd" if protocol == "dg" else protocol
            reason = why[method].get(entry) or f"no {entry} config for shots {' '.join(map(str, shots))}"
            via = " (dg evaluates the xd training)" if protocol == "dg" else ""
            print(f"preset {protocol}: {method} left out{via}: {reason}", file=sys.stderr)
            continue
        if smoke and not given_shots:  # one K per config: every yaml of the preset runs, at its fewest shots
            groups = {config: ks[:1] for config, ks in groups.items()}
        for config, ks in groups.items():
            name = f"{method.lower()}_{protocol}" + (f"_{os.path.basename(config)}" if len(groups) > 1 else "")
            task = dict(trainer=method, config=config, eval_only=eval_only, shots=ks, seeds=seeds,
                        opts=opts_for(method, config))
            if protocol in ("b2n", "fewshot"):
                task.update(protocol=protocol, datasets=pick(BENCHMARK_DATASETS))
            else:
                task.update(protocol="xd", source=smoke_mode.standin(XD_SOURCE) if smoke else XD_SOURCE,
                            datasets=pick(XD_TARGETS) if protocol == "xd" else [],
                            variants=pick(DG_TARGETS) if protocol == "dg" else [])
            tasks[name] = task
    if amp:
        print(f"--gpus cpu: fp16 configs run in amp (bf16 autocast) on the CPU: {', '.join(amp)}", file=sys.stderr)
    return {"base": base, **tasks, "pipeline": [dict(gpu_ids=gpus, tasks=list(tasks))]}
