"""Config building with Dassl's merge order, strict keys and readable errors.

Merge order (dassl_contract.md §2.1):
    defaults → every registered trainer's node (add_config) → dataset yaml → trainer yaml
    → per-dataset overrides declared by the trainer → CLI flags → trailing ``KEY VALUE`` opts → freeze
An unknown key fails naming the key, the file it came from and the closest valid keys.
"""

from __future__ import annotations

import difflib
import os
from argparse import Namespace
from collections.abc import Iterable
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from vltune.config.defaults import get_cfg_default
from vltune.registry import DATASETS, TRAINERS

__all__ = ["CN", "ConfigError", "get_cfg", "get_cfg_default", "extend_cfg", "merge_file", "merge_opts", "flat_keys"]


class ConfigError(ValueError):
    """A config key or value that cannot be merged."""


def flat_keys(cfg: CN, prefix: str = "") -> dict[str, Any]:
    """``{"OPTIM.LR": 0.002, ...}`` for every leaf of ``cfg``."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, CN):
            out.update(flat_keys(v, key + "."))
        else:
            out[key] = v
    return out


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.6)
    return f"; closest valid keys: {', '.join(close)}" if close else ""


def _check_keys(cfg: CN, keys: Iterable[str], source: str) -> None:
    valid = flat_keys(cfg)
    nodes = {k.rsplit(".", i)[0] for k in valid for i in range(1, k.count(".") + 1)}
    for key in keys:
        if key not in valid and key not in nodes:
            raise ConfigError(f"unknown config key {key!r} in {source}{_suggest(key, valid)}")


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def extend_cfg(cfg: CN) -> CN:
    """Add every registered trainer's own node (``add_config``); two methods may not disagree on a shared key."""
    owner: dict[str, tuple[str, Any]] = {}
    for name in TRAINERS.registered_names():
        add_config = TRAINERS.meta(name).get("add_config")
        if add_config is None:
            continue
        probe = get_cfg_default()
        before = flat_keys(probe)
        add_config(probe)
        for key, value in flat_keys(probe).items():
            if key in before and before[key] == value:
                continue
            if key in owner and owner[key][1] != value:
                raise ConfigError(
                    f"trainers {owner[key][0]} and {name} both define {key} with different defaults "
                    f"({owner[key][1]!r} vs {value!r}); a shared key is defined by its owner only"
                )
            owner.setdefault(key, (name, value))
        add_config(cfg)
    return cfg


def merge_file(cfg: CN, path: str) -> None:
    """Merge a yaml file, naming the file in every error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    data.pop("_BASE_", None)
    _check_keys(cfg, _leaf_keys(data), path)
    try:
        cfg.merge_from_other_cfg(CN(data))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path}: {e}") from e


def merge_opts(cfg: CN, opts: list[str], source: str = "command-line opts") -> None:
    """Merge trailing ``KEY VALUE`` pairs (yacs literal evaluation; the last occurrence wins)."""
    if len(opts) % 2:
        raise ConfigError(f"{source}: expected KEY VALUE pairs, got an odd number of items: {opts}")
    _check_keys(cfg, opts[0::2], source)
    try:
        cfg.merge_from_list(list(opts))
    except (ValueError, KeyError, AssertionError) as e:
        raise ConfigError(f"{source}: {e}") from e


def _reset_cfg(cfg: CN, args: Namespace) -> None:
    """CLI flags → config keys (Dassl's reset_cfg). ``--seed 0`` counts as set (upstream ignores it)."""
    flag_map = {
        "root": "DATASET.ROOT", "output_dir": "OUTPUT_DIR", "resume": "RESUME", "trainer": "TRAINER.NAME",
        "backbone": "MODEL.BACKBONE.NAME", "head": "MODEL.HEAD.NAME", "transforms": "INPUT.TRANSFORMS",
        "source_domains": "DATASET.SOURCE_DOMAINS", "target_domains": "DATASET.TARGET_DOMAINS",
    }
    for attr, key in flag_map.items():
        value = getattr(args, attr, None)
        if value:
            merge_opts(cfg, [key, value if isinstance(value, str) else str(tuple(value))], f"--{attr}")
    seed = getattr(args, "seed", None)
    if seed is not None and seed >= 0:
        cfg.SEED = int(seed)


def get_cfg(args: Namespace | None = None, *, dataset_config_file: str = "", config_file: str = "",
            opts: list[str] | None = None, freeze: bool = True) -> CN:
    """Build the run config in Dassl's merge order.

    Args:
        args: parsed train.py arguments (``dataset_config_file``, ``config_file``, ``opts`` and flags); keyword
            arguments are used when ``args`` is None (library use, tests).
    """
    if args is not None:
        dataset_config_file = getattr(args, "dataset_config_file", "") or ""
        config_file = getattr(args, "config_file", "") or ""
        opts = list(getattr(args, "opts", None) or [])
    opts = list(opts or [])
    import trainers  # noqa: F401  (fills TRAINERS so every node exists before yaml files merge)

    cfg = extend_cfg(get_cfg_default())
    if dataset_config_file:
        merge_file(cfg, dataset_config_file)
    if config_file:
        merge_file(cfg, config_file)
    trainer_name = _peek_trainer(cfg, args, opts)
    if trainer_name:
        overrides = TRAINERS.meta(trainer_name).get("dataset_overrides") or {}
        per_dataset = overrides.get(_peek(cfg, opts, "DATASET.NAME"))
        if per_dataset:
            merge_opts(cfg, [x for kv in per_dataset.items() for x in (kv[0], repr(kv[1]))],
                       f"{trainer_name} per-dataset overrides")
    if args is not None:
        _reset_cfg(cfg, args)
    merge_opts(cfg, opts)
    if cfg.TRAINER.NAME:
        cfg.TRAINER.NAME = TRAINERS.canonical(cfg.TRAINER.NAME)
    if cfg.DATASET.NAME:  # fail before anything runs, with a did-you-mean
        import datasets  # noqa: F401

        DATASETS.canonical(cfg.DATASET.NAME)
    if freeze:
        cfg.freeze()
    return cfg


def _peek(cfg: CN, opts: list[str], key: str) -> Any:
    value = flat_keys(cfg).get(key)
    for k, v in zip(opts[0::2], opts[1::2]):
        if k == key:
            value = v
    return value


def _peek_trainer(cfg: CN, args: Namespace | None, opts: list[str]) -> str:
    name = (getattr(args, "trainer", "") if args is not None else "") or _peek(cfg, opts, "TRAINER.NAME")
    return TRAINERS.canonical(name) if name else ""
