"""Smoke mode of the paper presets (``VLTUNE_SMOKE=1``, ``scripts/<benchmark>.sh --smoke``): the same methods,
protocol and trainer yaml files as the real benchmark, run on MiniBench stand-ins with the mini CLIP, offline on a
CPU, in minutes. It checks a setup (the configs merge and build, every method trains, saves, reloads and evaluates,
the tables come out) before GPUs are booked; its accuracies mean nothing.

What changes against the real preset:

* datasets: each benchmark dataset is played by a MiniBench dataset (``STANDINS``); by default only one per role
  (``DEFAULT_DATASETS``); ``--datasets`` takes benchmark names (mapped) or the MiniBench names themselves;
* the model: backbone ``vltune-tiny`` with the MiniBench mini CLIP, and the data, both generated on first use
  (``prepare="minibench"``) into the data root (``VLTUNE_DATA``, default ``data/``); the weights go to
  ``weights/minibench-clip.pt`` (shared with ``configs.py``'s suite) or, for another data root, into that root;
* the run: one seed, ``SHOTS`` shots (few-shot: the smallest K of each of the method's configs, so every yaml of
  the preset runs), one epoch without warmup, training batches of at most ``MAX_BATCH``, no loader workers, the
  mini CLIP's input size, each method's registered tiny-CLIP opts (``test_overrides["opts"]`` of its registration,
  e.g. MaPLe's ``PROMPT_DEPTH 2``: the mini CLIP has two blocks per tower), on the CPU (fp16 configs in amp), two
  jobs at once; output under ``output/smoke/<protocol>``;
* the Skip Tuning ablation: ``SMOKE_ABLATIONS``' values (start layers the mini CLIP has) unless given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from vltune.registry import TRAINERS
from vltune.runner.schema import SuiteError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKBONE = "vltune-tiny"
#: the mini CLIP ``configs.py``'s MiniBench suite makes; smoke runs share it when they use the default data root
DEFAULT_WEIGHTS = os.path.join(_REPO, "weights", "minibench-clip.pt")
WEIGHTS_NAME = "minibench-clip.pt"  # the mini CLIP's file inside another data root

#: benchmark dataset -> the MiniBench dataset that plays it (vltune/data/minibench.py describes them): MiniUnion is
#: the broad source (ImageNet) and its four shifted variants the DG targets, as in configs.py; the others by kind
STANDINS = {
    "imagenet": "mini_union",
    "caltech101": "mini_shapes",  # generic objects
    "dtd": "mini_textures",  # textures
    "oxford_pets": "mini_objects", "stanford_cars": "mini_objects", "oxford_flowers": "mini_objects",
    "food101": "mini_objects", "fgvc_aircraft": "mini_objects",  # fine-grained: colour x shape compositions
    "sun397": "digits", "eurosat": "digits", "ucf101": "digits",  # the rest: real handwritten digits
    "imagenetv2": "mini_union_v2", "imagenet_sketch": "mini_union_sketch", "imagenet_a": "mini_union_noise",
    "imagenet_r": "mini_union_inverted",
}
#: the benchmark datasets a smoke run uses when ``--datasets`` is not given: one stand-in per role
DEFAULT_DATASETS = {"b2n": ["caltech101"], "fewshot": ["caltech101"], "ablation": ["caltech101"],
                    "xd": ["caltech101"], "dg": ["imagenet_sketch"]}
SEEDS = [1]
SHOTS = 4
MAX_BATCH = 4
SLOTS = 2  # jobs at once on the CPU, each with half the cores
#: the Skip Tuning ablation grids in smoke (keys as presets.ABLATIONS): the mini CLIP has blocks 0 and 1
SMOKE_ABLATIONS = {"start_layer": [0, 1], "top_ratio": [1.0, 0.5], "lambda": [0.3, 1.0]}


def standin(name: str) -> str:
    """The MiniBench dataset a smoke run uses for ``name`` (a MiniBench name stays itself)."""
    return STANDINS.get(name, name)


def image_size(backbone: str = BACKBONE) -> int:
    """The input resolution of a vltune tiny CLIP (``vltune/clip/model_configs/<backbone>.json``)."""
    with open(os.path.join(_REPO, "vltune", "clip", "model_configs", f"{backbone}.json")) as f:
        return int(json.load(f)["vision_cfg"]["image_size"])


def base(protocol: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The runner's ``base`` for a smoke run: the MiniBench data root and mini CLIP (made when missing), output
    under ``output/smoke/<protocol>``. Relative paths given in ``env`` are taken from the working directory."""
    backbone = env.get("VLTUNE_BACKBONE", "").strip()
    if backbone and backbone != BACKBONE:
        raise SuiteError(f"VLTUNE_BACKBONE (--backbone) is {backbone!r}, but --smoke runs the mini CLIP "
                         f"({BACKBONE}): drop --backbone (or unset VLTUNE_BACKBONE) for the smoke run")
    data = os.path.abspath(env.get("VLTUNE_DATA") or os.path.join(_REPO, "data"))
    default_weights = DEFAULT_WEIGHTS if data == os.path.join(_REPO, "data") else os.path.join(data, WEIGHTS_NAME)
    weights = os.path.abspath(os.path.expanduser(env.get("VLTUNE_WEIGHTS") or default_weights))
    output = os.path.abspath(env.get("VLTUNE_OUTPUT") or os.path.join(_REPO, "output", "smoke", protocol))
    return dict(data=dict(root=data), model=dict(backbone=BACKBONE, weights=weights), output=dict(root=output),
                prepare="minibench", slots_per_gpu=int(env.get("VLTUNE_SLOTS") or SLOTS))


def run_opts() -> list[str]:
    """The overrides that make every smoke job tiny (the method's own hyper-parameters stay the preset's)."""
    n = image_size()
    return ["INPUT.SIZE", f"({n}, {n})", "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0",
            "DATALOADER.NUM_WORKERS", "0"]


def tiny_clip_opts(method: str) -> list[str]:
    """The opts ``method`` registered for the tiny CLIP (``test_overrides["opts"]``: depths the mini CLIP has),
    less any precision: on the CPU the presets decide it (an fp16 config runs in amp)."""
    given = (TRAINERS.meta(method).get("test_overrides") or {}).get("opts") or {}
    return [str(x) for key, value in given.items() if not key.endswith(".PREC") for x in (key, value)]


def batch_opts(cfg: Any) -> list[str]:
    """Cap the training batch at ``MAX_BATCH`` (a smaller one, e.g. CoCoOp's 1, stays)."""
    size = int(cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
    return ["DATALOADER.TRAIN_X.BATCH_SIZE", str(MAX_BATCH)] if size > MAX_BATCH else []
