"""A job's identity: what its computation depends on, so a finished run is recognised as done after vltune changes.

The identity of a config is a flat ``{key: value}`` map over

* vltune's core keys (data, input, model, optim, dataloader, train, test, seed, ``TRAINER.NAME``/``PREC``), less the
  keys that do not change what a run computes (``EXCLUDED``: output folder, data root, verbosity, workers);
* the config units its trainer owns (``TRAINERS.owned_units``: the nodes its ``add_config`` creates) and the ones it
  reads (``TRAINER.<config_node>`` and every ``config_reads`` entry along its class hierarchy, e.g. a plugin node);
  never another trainer's node;
* ``weights``: the CLIP weights by content (``sha256:<hex>``, cached by path + size + mtime), never by path, so the
  same file moved, or a copied output folder, is the same run; whichever way the file arrived (``WEIGHTS``, the
  default search path or a download into it, or an open_clip ``PRETRAINED`` tag's cached file), it is the digest of
  the file the job loads.

Two identities are compared key by key (``identity_diff``): a key present in both must be equal; a key only the new
config has counts as equal when it holds its default (a key a newer vltune added at its default changes nothing); a
key only the old record has (a key vltune removed) is ignored. ``identity_hash`` is a stable label of an identity: it
hashes the keys that differ from their defaults, so adding a key at its default leaves it unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

from yacs.config import CfgNode as CN

from vltune.config.defaults import get_cfg_default
from vltune.config.nodes import flat_keys, under
from vltune.fileio import atomic_write

#: keys that do not change what a run computes: where it writes, where the data sits, how chatty it is, and where
#: the weights come from (a path or a pretrained tag: the weights enter as their digest; records made before the tag
#: existed hold Dassl's ``PRETRAINED: True`` there)
EXCLUDED = ("OUTPUT_DIR", "RESUME", "DATASET.ROOT", "VERBOSE", "TRAIN.PRINT_FREQ", "TRAIN.TENSORBOARD",
            "DATALOADER.NUM_WORKERS", "MODEL.BACKBONE.WEIGHTS", "MODEL.BACKBONE.PRETRAINED")
WEIGHTS_KEY = "weights"
_ALWAYS_CORE = ("TRAINER.NAME", "TRAINER.PREC")


@functools.lru_cache(maxsize=1)
def _core_keys() -> frozenset[str]:
    return frozenset(k for k in flat_keys(get_cfg_default()) if not k.startswith("TRAINER.") or k in _ALWAYS_CORE)


def trainer_units(trainer: str) -> tuple[str, ...]:
    """The config units a job of ``trainer`` depends on: the ones it owns and the ones it reads."""
    from vltune.registry import TRAINERS

    if not trainer:
        return ()
    cls = TRAINERS.get(trainer)
    units = list(TRAINERS.owned_units(trainer))
    node = getattr(cls, "config_node", None)
    if node:
        units.append(f"TRAINER.{node}")
    for klass in cls.__mro__:
        units += list(vars(klass).get("config_reads", ()))
    return tuple(dict.fromkeys(units))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def identity_of(flat: dict[str, Any], weights: str) -> dict[str, Any]:
    """The identity of a flat config (see the module docstring); ``weights`` is ``weights_identity``'s value."""
    units = trainer_units(str(flat.get("TRAINER.NAME", "")))
    core = _core_keys()
    out = {k: v for k, v in flat.items() if (k in core or under(k, units)) and k not in EXCLUDED}
    out[WEIGHTS_KEY] = weights
    return _jsonable(dict(sorted(out.items())))


def identity(cfg: CN) -> dict[str, Any]:
    """The identity of a run config (computes or reuses the weights digest)."""
    backbone = cfg.MODEL.BACKBONE
    return identity_of(flat_keys(cfg), weights_identity(backbone.NAME, backbone.WEIGHTS, backbone.PRETRAINED))


def identity_of_saved(config: dict[str, Any]) -> dict[str, Any]:
    """The identity of a config saved in a record of schema 1 (which has no ``identity`` of its own)."""
    flat = flat_keys(config)
    tag = flat.get("MODEL.BACKBONE.PRETRAINED", "")
    return identity_of(flat, weights_identity(str(flat.get("MODEL.BACKBONE.NAME", "")),
                                              str(flat.get("MODEL.BACKBONE.WEIGHTS", "")),
                                              tag if isinstance(tag, str) else ""))


def _defaults() -> dict[str, Any]:
    """Every key's default: vltune's and every registered trainer's (recomputed when a trainer registers)."""
    from vltune.registry import TRAINERS

    return _defaults_of(tuple(TRAINERS.registered_names()))


@functools.lru_cache(maxsize=4)
def _defaults_of(trainers: tuple[str, ...]) -> dict[str, Any]:
    from vltune.config import extend_cfg

    return _jsonable(flat_keys(extend_cfg(get_cfg_default())))


def identity_hash(ident: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the identity's entries that differ from their defaults, plus the weights."""
    defaults = _defaults()
    kept = {k: v for k, v in ident.items() if k == WEIGHTS_KEY or defaults.get(k, _MISSING) != v}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


_MISSING = object()


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, old value, new value)]`` where the two identities differ (``"(absent)"`` for a missing key)."""
    defaults = _defaults()
    out = []
    for key in sorted({*old, *new}):
        if key in old and key in new:
            if old[key] != new[key]:
                out.append((key, old[key], new[key]))
        elif key in new and new[key] != defaults.get(key, _MISSING):
            out.append((key, "(absent)", new[key]))
    return out


def format_diff(diff: list[tuple[str, Any, Any]]) -> str:
    """``OPTIM.LR 0.002 → 0.001, …``."""
    return ", ".join(f"{k} {_short(a)} → {_short(b)}" for k, a, b in diff)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- weights by content ---------------------------------------------------------------------------------------
def _digest_cache_path() -> str:
    root = os.environ.get("VLTUNE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vltune")
    return os.path.join(root, "weights_sha256.json")


_MEMO: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """sha256 of a file, computed once per (real path, size, mtime) and kept in ``~/.cache/vltune`` (or
    ``$VLTUNE_CACHE_DIR``) so every job of a suite reuses it."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key in _MEMO:
        return _MEMO[key]
    cache_path = _digest_cache_path()
    entry = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    digest = cache.get(entry) if isinstance(cache, dict) else None
    if not digest:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        cache = cache if isinstance(cache, dict) else {}
        cache = {k: v for k, v in cache.items() if not k.startswith(real + "|")}
        cache[entry] = digest
        try:
            atomic_write(cache_path, json.dumps(cache, indent=1).encode())
        except OSError:  # a read-only home: the digest is still right, just computed again next time
            pass
    _MEMO[key] = digest
    return digest


def weights_identity(backbone: str, weights: str, pretrained: str = "") -> str:
    """``sha256:<hex>`` of the weights file a job of ``backbone``/``weights``/``pretrained`` loads; ``missing:<what>``
    when that file is not on disk yet (never downloaded here: the runner fetches it, then ``refresh_identities``; a
    job that cannot get it fails and says where it looked)."""
    from vltune.clip.loading import find_weights

    try:
        path = find_weights(backbone, weights, pretrained) if backbone else None
    except (FileNotFoundError, ValueError):
        path = None
    if path is None:
        return f"missing:{weights or backbone}{':' + pretrained if pretrained else ''}"
    return f"sha256:{file_digest(str(path))}"
