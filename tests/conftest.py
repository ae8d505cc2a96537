"""Shared fixtures: the generated digits dataset in CoOp layout and tiny CLIP weights (random and pretrained).

The pretrained tiny CLIP takes about 30 s to build on 2 cores, so it is cached under ``.pytest_cache`` keyed by
a hash of the code and settings that produce it; any change to them rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402  (after the shim)

import vltune  # noqa: E402,F401  (compat shim first)
from vltune.plugins import load_builtins  # noqa: E402

load_builtins()  # the entry points' plugin packages: trainers and datasets

CACHE = REPO / ".pytest_cache" / "vltune-fixtures"


def _source_key(*files: str, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        h.update((REPO / f).read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def digits_root() -> str:
    """Data root holding ``digits/`` (images + split_zhou_Digits.json)."""
    from vltune.data.synthetic import write_digits_dataset

    root = CACHE / f"data-{_source_key('vltune/data/synthetic.py')}"
    write_digits_dataset(str(root))
    return str(root)


@pytest.fixture(scope="session")
def tiny_clip_weights(digits_root: str) -> str:
    """A vltune-tiny CLIP contrastively pretrained on the digits TRAIN split (plain state dict)."""
    from vltune.clip.pretrain import pretrain

    key = _source_key("vltune/clip/pretrain.py", "vltune/data/synthetic.py")
    path = CACHE / f"tiny-digits-{key}.pt"
    if not path.exists():
        folder = os.path.join(digits_root, "digits")
        pretrain([(os.path.join(folder, "split_zhou_Digits.json"), os.path.join(folder, "images"))], str(path))
    return str(path)


@pytest.fixture(scope="session")
def random_clip_weights() -> str:
    """A randomly initialised vltune-tiny CLIP (seed 0) as a plain state dict."""
    import open_clip
    import torch

    import vltune.clip  # noqa: F401

    path = CACHE / "tiny-random.pt"
    if not path.exists():
        torch.manual_seed(0)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(open_clip.create_model("vltune-tiny", pretrained=None).state_dict(), path)
    return str(path)


def tiny_opts(root: str, weights: str, **extra: object) -> list[str]:
    """Opts for a fast CPU run of any trainer on the digits dataset with a tiny CLIP."""
    opts = {"DATASET.ROOT": root, "DATASET.NAME": "Digits", "MODEL.BACKBONE.NAME": "vltune-tiny",
            "MODEL.BACKBONE.WEIGHTS": weights, "INPUT.SIZE": "(32, 32)", "INPUT.INTERPOLATION": "bicubic",
            "INPUT.PIXEL_MEAN": "[0.48145466, 0.4578275, 0.40821073]",
            "INPUT.PIXEL_STD": "[0.26862954, 0.26130258, 0.27577711]", "INPUT.TRANSFORMS": "('normalize',)",
            "DATALOADER.NUM_WORKERS": "0", "TRAINER.PREC": "fp32", "USE_CUDA": "False"}
    opts.update({k: str(v) for k, v in extra.items()})
    return [x for kv in opts.items() for x in kv]


WEIGHTS = {"random": "random_clip_weights", "pretrained": "tiny_clip_weights"}


@pytest.fixture(scope="session")
def make_cfg(request, tmp_path_factory, digits_root):
    """``make_cfg(name, out=None, *, weights="random", opts=None, test_overrides=False, **settings)``: a frozen cfg
    that runs trainer ``name`` on the digits dataset with a tiny CLIP (:func:`tiny_opts`).

    ``weights``: ``"random"`` (:func:`random_clip_weights`), ``"pretrained"`` (:func:`tiny_clip_weights`) or a path.
    ``out`` (``OUTPUT_DIR``) defaults to a fresh temporary folder. Config keys come from ``opts`` (a dict, e.g. a
    test file's defaults), then with ``test_overrides`` from the opts the trainer registered for the tiny CLIP
    (``TRAINERS.register(..., test_overrides=dict(opts={...}))``), then from ``settings``, which win:
    ``make_cfg("CoOp", opts=BASE, **{"SEED": 7})``.
    """
    from vltune.config import get_cfg
    from vltune.registry import TRAINERS

    def make(name: str, out: str | Path | None = None, *, weights: str = "random", opts: dict | None = None,
             test_overrides: bool = False, **settings: object):
        path = request.getfixturevalue(WEIGHTS[weights]) if weights in WEIGHTS else weights
        out = tmp_path_factory.mktemp(name) if out is None else out
        keys = {"TRAINER.NAME": name, "OUTPUT_DIR": str(out), **(opts or {})}
        if test_overrides:
            keys.update((TRAINERS.meta(name).get("test_overrides") or {}).get("opts", {}))
        keys.update(settings)
        return get_cfg(opts=tiny_opts(digits_root, path, **keys))

    return make


@pytest.fixture(scope="session")
def make_trainer(make_cfg):
    """``make_trainer(name, out=None, *, eval_only=False, seed=None, **kwargs)``: the trainer built from
    ``make_cfg(name, out, **kwargs)`` (``weights``, ``opts``, ``test_overrides`` and config keys). ``seed``: seed
    python, numpy and torch first, as train.py does before building (for trainers that draw their initial
    parameters)."""
    from vltune.engine import build_trainer, set_random_seed

    def make(name: str, out: str | Path | None = None, *, eval_only: bool = False, seed: int | None = None,
             **kwargs: object):
        if seed is not None:
            set_random_seed(seed)
        return build_trainer(make_cfg(name, out, **kwargs), eval_only=eval_only)

    return make


@pytest.fixture(scope="session")
def minibench(tmp_path_factory):
    """(data root, mini CLIP weights), generated and pretrained once, cached by the code that makes them."""
    from vltune.clip.pretrain import build_minibench_clip
    from vltune.data.minibench import write_minibench

    key = _source_key("vltune/data/minibench.py", "vltune/data/mini_render.py", "vltune/data/synthetic.py")
    root = str(CACHE / f"minibench-{key}")
    folders = write_minibench(root)
    weights = CACHE / f"minibench-clip-{_source_key('vltune/clip/pretrain.py', extra=key)}.pt"
    if not weights.exists():
        build_minibench_clip(folders, str(weights))
    return root, str(weights)


@torch.no_grad()
def eval_logits(trainer, images: torch.Tensor) -> torch.Tensor:
    """A trainer's logits for ``images`` the way its evaluation computes them (per-evaluation caches included)."""
    trainer.set_model_mode("eval")
    trainer.before_evaluate()
    try:
        return trainer.model_inference(images)
    finally:
        trainer.after_evaluate()


@pytest.fixture(scope="session")
def coop_layout_root(tmp_path_factory) -> Path:
    """A data root with miniature copies of all 15 CoOp datasets in their real layouts (split JSON form); tests
    that change it work on a copy."""
    from layouts import LAYOUTS

    root = tmp_path_factory.mktemp("coop-layouts")
    for make in LAYOUTS.values():
        make(root, False)
    return root
