"""Paper presets: the experiments of the papers as runner tasks (``presets/*.py`` are thin experiment files over this).

``METHODS`` says which ``configs/trainers/<Method>/`` yaml each registered method uses per protocol, following
methods.md §15 (the configs' own headers cite their sources); ``None`` where the method's papers define no such
experiment, so the preset leaves it out and says so. ``experiment(protocol)`` builds the ``base``, the tasks and the
``pipeline`` of one benchmark from environment variables, which the ``scripts/*.sh`` wrappers set:

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

#: the 11 base-to-new / few-shot datasets (configs/datasets/<name>.yaml), in the papers' table order
BENCHMARK_DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                      "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
XD_SOURCE = "imagenet"
XD_TARGETS = BENCHMARK_DATASETS[1:]  # the 10 cross-dataset targets
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
SEEDS = [1, 2, 3]
FEWSHOT_SHOTS = [1, 2, 4, 8, 16]
PROTOCOLS = ("b2n", "fewshot", "xd", "dg", "ablation")

#: method → {protocol: config} (few-shot: {shots: config} where the epochs depend on K); None: not defined upstream
_ZS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                   "trainers", "ZeroshotCLIP", "vit_b16.yaml")  # ZeroshotCLIP2 (the ensemble) shares it
METHODS: dict[str, dict[str, Any]] = {
    "ZeroshotCLIP": {"b2n": "vit_b16", "fewshot": "vit_b16", "xd": "vit_b16"},
    "ZeroshotCLIP2": {"b2n": _ZS, "fewshot": _ZS, "xd": _ZS},
    "CoOp": {"b2n": "vit_b16_ep100", "xd": "vit_b16_ep50",
             "fewshot": {1: "vit_b16_ep50", 2: "vit_b16_ep100", 4: "vit_b16_ep100", 8: "vit_b16", 16: "vit_b16"}},
    "CoCoOp": {"b2n": "vit_b16_c4_ep10_batch1_ctxv1", "xd": "vit_b16_c4_ep10_batch1_ctxv1",
               "fewshot": "vit_b16_c4_ep10_batch1_ctxv1"},
    "ProGrad": {"b2n": "vit_b16_ep100_ctx", "xd": "vit_b16_ep100_ctx", "fewshot": None},
    "KgCoOp": {"b2n": "vit_b16_ep100_ctxv1", "xd": "vit_b16_ep100_ctxv1", "fewshot": None},
    "MaPLe": {"b2n": "vit_b16_c2_ep5_batch4_2ctx", "xd": "vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
              "fewshot": "vit_b16_c2_ep5_batch4_2ctx_few_shot"},
    "PromptSRC": {"b2n": "vit_b16_c2_ep20_batch4_4+4ctx", "xd": "vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets",
                  "fewshot": "vit_b16_c2_ep50_batch4_4+4ctx_few_shot"},
    "TCP": {"b2n": "vit_b16_ep100_ctxv1", "xd": "vit_b16_ep100_ctxv1_cross_datasets", "fewshot": None},
    "ExtrasLinearProbeCoOp": {"b2n": "vit_b16_ep10_bs4_lr35", "xd": None, "fewshot": None},
    "ExtrasLinearProbeCoCoOp": {"b2n": "vit_b16_c4_ep10_batch1_ctxv1", "xd": None, "fewshot": None},
    "ExtrasLinearProbeKgCoOp": {"b2n": "vit_b16_ep10_ctxv1_bs4_lr35", "xd": None, "fewshot": None},
    "ExtrasLinearProbeMaPLe": {"b2n": "vit_b16_c2_ep10_batch4_2ctx", "xd": None, "fewshot": None},
    "CoPrompt": {"b2n": "vit_b16_c2_ep5_batch4_2ctx_randaug", "xd": None, "fewshot": None},
    "CLIPAdapter": {"b2n": "vit_b16_ep10_bs4", "xd": "vit_b16_ep10_bs4", "fewshot": None},
    "OriginCLIPAdapter": {"b2n": "vit_b16_ep10_bs4", "xd": "vit_b16_ep10_bs4", "fewshot": None},
    "FinetuneCLIP": {"b2n": "vit_b16_ep10_bs4", "xd": "vit_b16_ep10_bs4_cross_datasets", "fewshot": None},
    "SkipTuning": {"b2n": "vit_b16_bs4", "xd": "vit_b16_bs4_cross_datasets", "fewshot": "vit_b16_bs4_few_shot"},
    **{name: {"b2n": "vit_b16_b2n", "xd": "vit_b16_cross_datasets", "fewshot": "vit_b16_few_shot"}
       for name in ("ResAdapter", "ResPrefix", "ResPrompt", "ResTuningBypass")},
}
EVAL_ONLY = {"ZeroshotCLIP", "ZeroshotCLIP2"}
#: the Skip Tuning ablations (base-to-new grid searches, methods.md §13.6)
ABLATIONS = {"start_layer": ("TRAINER.SKIP.START_LAYER", "VLTUNE_START_LAYERS", [2, 4, 6, 8, 10]),
             "top_ratio": ("TRAINER.SKIP.TOP_RATIO", "VLTUNE_TOP_RATIOS", [1.0, 0.9, 0.7, 0.5, 0.3, 0.1]),
             "lambda": ("TRAINER.SKIP.LAMBDA", "VLTUNE_LAMBDAS", [0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])}


def _words(env: Mapping[str, str], key: str) -> list[str] | None:
    value = env.get(key, "").strip()
    return shlex.split(value) if value else None


def _numbers(words: list[str], key: str) -> list[float]:
    try:
        return [float(w) if "." in w else int(w) for w in words]
    except ValueError:
        raise ValueError(f"{key} takes numbers separated by spaces, got {' '.join(words)!r}") from None


def config_for(method: str, protocol: str, shots: int = 16) -> str | None:
    """The yaml name (under configs/trainers/<method>/) a method uses for ``protocol`` (``dg`` uses ``xd``'s)."""
    entry = METHODS[method].get("xd" if protocol == "dg" else protocol)
    return entry.get(shots) if isinstance(entry, dict) else entry


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
    methods = _words(env, "VLTUNE_METHODS") or (["SkipTuning"] if protocol == "ablation" else list(METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"VLTUNE_METHODS: no preset for {unknown}; methods: {', '.join(METHODS)}")

    def pick(names: list[str]) -> list[str]:
        return [d for d in names if d in only] if only else names

    common = dict(seeds=seeds, opts=list(opts))
    tasks: dict[str, dict[str, Any]] = {}
    for method in methods:
        eval_only = method in EVAL_ONLY
        if protocol == "ablation":
            for name, (key, env_key, default) in ABLATIONS.items():
                values = _numbers(_words(env, env_key) or [str(v) for v in default], env_key)
                tasks[f"{method.lower()}_ablation_{name}"] = dict(
                    trainer=method, config=config_for(method, "b2n"), protocol="b2n",
                    datasets=pick(BENCHMARK_DATASETS), shots=shots[:1], grid=dict(params={key: values}), **common)
            continue
        groups: dict[str, list[int]] = {}
        for k in shots:
            config = config_for(method, protocol, k)
            if config is not None:
                groups.setdefault(config, []).append(k)
        if not groups:
            print(f"preset {protocol}: {method} has no {protocol} config upstream; left out", file=sys.stderr)
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
