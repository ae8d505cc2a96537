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
VLTUNE_OUTPUT          output root                                             ``output/<benchmark>``
VLTUNE_GPUS            GPU ids, or ``cpu``                                     ``0``
VLTUNE_SLOTS           jobs at once per GPU                                    ``1``
VLTUNE_METHODS         methods (space separated)                               every method with a config
VLTUNE_SEEDS           seeds                                                   ``1 2 3``
VLTUNE_SHOTS           shots (few-shot: the curve; others: one value)          ``1 2 4 8 16`` / ``16``
VLTUNE_DATASETS        restrict the datasets (smoke runs)                      the benchmark's
VLTUNE_OPTS            extra ``KEY VALUE`` config overrides for every job      none
=====================  ======================================================  =========================

The Skip Tuning ablations read ``VLTUNE_START_LAYERS``, ``VLTUNE_TOP_RATIOS`` and ``VLTUNE_LAMBDAS`` (defaults: the
paper's ranges, methods.md §13.6).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from typing import Any

from vltune.plugins import HINT
from vltune.registry import PRESET_PROTOCOLS, TRAINERS

#: the 11 base-to-new / few-shot datasets (configs/datasets/<name>.yaml), in the papers' table order
BENCHMARK_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                      "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_SOURCE = "imagenet"
XD_TARGETS = BENCHMARK_DATASETS[1:]  # the 10 cross-dataset targets
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
SEEDS = [1, 2, 3]
FEWSHOT_SHOTS = [1, 2, 4, 8, 16]
PROTOCOLS = ("b2n", "fewshot", "xd", "dg", "ablation")

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


def experiment(protocol: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``base``, one task per method (and config group) and ``pipeline`` for ``protocol``.

    Methods without a config for the protocol are left out with a line on stderr; an unknown method fails.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown preset protocol {protocol!r}: choose from {', '.join(PROTOCOLS)}")
    env = os.environ if env is None else env
    base = dict(data=dict(root=env.get("VLTUNE_DATA") or "data"),
                model=dict(backbone=env.get("VLTUNE_BACKBONE") or "ViT-B/16", weights=env.get("VLTUNE_WEIGHTS", "")),
                output=dict(root=env.get("VLTUNE_OUTPUT") or os.path.join("output", protocol)),
                slots_per_gpu=int(env.get("VLTUNE_SLOTS") or 1))
    seeds = [int(s) for s in _numbers(_words(env, "VLTUNE_SEEDS") or [str(s) for s in SEEDS], "VLTUNE_SEEDS")]
    default_shots = FEWSHOT_SHOTS if protocol == "fewshot" else [16]
    shots = [int(k) for k in _numbers(_words(env, "VLTUNE_SHOTS") or [str(k) for k in default_shots],
                                      "VLTUNE_SHOTS")]
    opts = _words(env, "VLTUNE_OPTS") or []
    only = _words(env, "VLTUNE_DATASETS")
    table, why, eval_only_set = methods(), reasons(), eval_only_methods()
    if not table:
        raise ValueError(f"no method is registered; {HINT}")
    chosen = _words(env, "VLTUNE_METHODS") or (["SkipTuning"] if protocol == "ablation" else list(table))
    unknown = [m for m in chosen if m not in table]
    if unknown:
        raise ValueError(f"VLTUNE_METHODS: no preset for {unknown}; methods: {', '.join(table)}")

    def pick(names: list[str]) -> list[str]:
        return [d for d in names if d in only] if only else names

    common = dict(seeds=seeds, opts=list(opts))
    tasks: dict[str, dict[str, Any]] = {}
    for method in chosen:
        eval_only = method in eval_only_set
        if protocol == "ablation":
            for name, (key, env_key, default) in ABLATIONS.items():
                values = _numbers(_words(env, env_key) or [str(v) for v in default], env_key)
                tasks[f"{method.lower()}_ablation_{name}"] = dict(
                    trainer=method, config=config_for(method, "b2n", table=table), protocol="b2n",
                    datasets=pick(BENCHMARK_DATASETS), shots=shots[:1], grid=dict(params={key: values}), **common)
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
        for config, ks in groups.items():
            name = f"{method.lower()}_{protocol}" + (f"_{os.path.basename(config)}" if len(groups) > 1 else "")
            task = dict(trainer=method, config=config, eval_only=eval_only, shots=ks, **common)
            if protocol in ("b2n", "fewshot"):
                task.update(protocol=protocol, datasets=pick(BENCHMARK_DATASETS))
            else:
                task.update(protocol="xd", source=XD_SOURCE,
                            datasets=pick(XD_TARGETS) if protocol == "xd" else [],
                            variants=pick(DG_TARGETS) if protocol == "dg" else [])
            tasks[name] = task
    return {"base": base, **tasks, "pipeline": [dict(gpu_ids=_gpus(env), tasks=list(tasks))]}
