"""Config building with Dassl's merge order, strict keys and readable errors.

Merge order (dassl_contract.md §2.1):
    defaults → every registered trainer's node (add_config) → dataset yaml → trainer yaml
    → the yaml files' ``PER_DATASET`` entry for DATASET.NAME → CLI flags → trailing ``KEY VALUE`` opts → freeze
An unknown key fails naming the key, the file it came from and the closest valid keys.

``PER_DATASET`` (a vltune extension, any yaml file) maps a dataset name to keys that apply only to that dataset,
e.g. Skip Tuning's "a quarter of the epochs on the large datasets"::

    OPTIM:
      MAX_EPOCH: 20
    PER_DATASET:
      ImageNet: {OPTIM.MAX_EPOCH: 5}
      SUN397: {OPTIM: {MAX_EPOCH: 5}}

Values are merged after both files (so command-line opts still win) and show in the saved ``config.yaml``.
"""

from __future__ import annotations

import difflib
import os
from argparse import Namespace
from collections.abc import Callable, Iterable
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from vltune.config.defaults import get_cfg_default
from vltune.config.nodes import flat_keys
from vltune.plugins import HINT
from vltune.registry import DATASETS, TRAINERS

__all__ = ["CN", "ConfigError", "get_cfg", "get_cfg_default", "extend_cfg", "merge_file", "merge_opts", "flat_keys"]


class ConfigError(ValueError):
    """A config key or value that cannot be merged."""


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


_CHECKED: set[tuple[tuple[str, int], ...]] = set()  # registry states whose trainer nodes were checked for conflicts


def _check_shared_keys(adders: list[tuple[str, Callable[[CN], None]]]) -> None:
    """Raise ``ConfigError`` when two trainers' ``add_config`` give one key different defaults."""
    owner: dict[str, tuple[str, Any]] = {}
    before = flat_keys(get_cfg_default())
    for name, add_config in adders:
        probe = get_cfg_default()
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


def extend_cfg(cfg: CN) -> CN:
    """Add every registered trainer's own node (``add_config``); two methods may not disagree on a shared key.

    The check runs once per set of registered trainers (the runner builds one config per job, hundreds per suite).
    """
    adders = [(name, fn) for name in TRAINERS.registered_names()
              if (fn := TRAINERS.meta(name).get("add_config")) is not None]
    state = tuple((name, id(fn)) for name, fn in adders)
    if state not in _CHECKED:
        _check_shared_keys(adders)
        _CHECKED.add(state)
    for _, add_config in adders:
        add_config(cfg)
    return cfg


def merge_file(cfg: CN, path: str) -> dict[str, dict]:
    """Merge a yaml file, naming the file in every error; returns its ``PER_DATASET`` block (not merged here)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid yaml{_yaml_position(e)}: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    data.pop("_BASE_", None)
    per_dataset = _per_dataset_block(data.pop("PER_DATASET", None) or {}, path)
    _merge_mapping(cfg, data, path)
    return per_dataset


def _yaml_position(error: yaml.YAMLError) -> str:
    """`` at line L, column C`` (1-based) of a yaml syntax error, or "" when PyYAML gives no position."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's one-line description of the problem (its ``str`` repeats the position over several lines)."""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return ", ".join(p for p in parts if p) or str(error).splitlines()[0]


def _dassl_pretrained_flag(value: Any) -> Any:
    """Dassl's ``MODEL.BACKBONE.PRETRAINED`` is a bool (an ImageNet-pretrained backbone, default True); vltune's
    is an open_clip pretrained tag. A Dassl config's bool (``True``/``False``, also as a command-line word) means no
    tag, so the user's Dassl yaml files and flags keep working."""
    return "" if isinstance(value, bool) or str(value) in ("True", "False") else value


def _merge_mapping(cfg: CN, data: dict, source: str) -> None:
    _check_keys(cfg, _leaf_keys(data), source)
    backbone = (data.get("MODEL") or {}).get("BACKBONE") if isinstance(data.get("MODEL"), dict) else None
    if isinstance(backbone, dict) and "PRETRAINED" in backbone:
        backbone["PRETRAINED"] = _dassl_pretrained_flag(backbone["PRETRAINED"])
    try:
        cfg.merge_from_other_cfg(CN(data))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{source}: {e}") from e


def _nest(entry: dict) -> dict:
    """``{"OPTIM.MAX_EPOCH": 5}`` and ``{"OPTIM": {"MAX_EPOCH": 5}}`` both become the nested form."""
    out: dict = {}
    for key, value in entry.items():
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(_nest(value))
        else:
            node[leaf] = _nest(value) if isinstance(value, dict) else value
    return out


def _per_dataset_block(block: Any, path: str) -> dict[str, dict]:
    """Validate ``PER_DATASET``: registered dataset names (did-you-mean), each mapping to config keys."""
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: PER_DATASET must map dataset names to config keys, got {type(block).__name__}")
    from vltune.registry import RegistryError

    out = {}
    for name, entry in block.items():
        try:
            canonical = DATASETS.canonical(str(name))
        except RegistryError as e:
            raise ConfigError(f"{path}: PER_DATASET: {e}") from e
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: PER_DATASET.{name} must be a mapping of config keys, e.g. "
                              f"{{OPTIM.MAX_EPOCH: 5}}")
        out[canonical] = _nest(entry)
    return out


def merge_opts(cfg: CN, opts: list[str], source: str = "command-line opts") -> None:
    """Merge trailing ``KEY VALUE`` pairs (yacs literal evaluation; the last occurrence wins)."""
    if len(opts) % 2:
        raise ConfigError(f"{source}: expected KEY VALUE pairs, got an odd number of items: {opts}")
    _check_keys(cfg, opts[0::2], source)
    opts = [_dassl_pretrained_flag(v) if i % 2 and opts[i - 1] == "MODEL.BACKBONE.PRETRAINED" else v
            for i, v in enumerate(opts)]
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
    if not len(TRAINERS):  # the method nodes would be missing and every method yaml would fail to merge
        raise ConfigError(f"no trainer is registered; {HINT}")
    cfg = extend_cfg(get_cfg_default())
    per_dataset: list[tuple[str, dict[str, dict]]] = []
    for path in (dataset_config_file, config_file):
        if path:
            per_dataset.append((path, merge_file(cfg, path)))
    dataset = _peek(cfg, opts, "DATASET.NAME")
    if dataset and any(block for _, block in per_dataset):
        dataset = DATASETS.canonical(str(dataset))
        for path, block in per_dataset:
            if dataset in block:
                _merge_mapping(cfg, block[dataset], f"{path} (PER_DATASET.{dataset})")
    if args is not None:
        _reset_cfg(cfg, args)
    merge_opts(cfg, opts)
    if cfg.TRAINER.NAME:
        cfg.TRAINER.NAME = TRAINERS.canonical(cfg.TRAINER.NAME)
    if cfg.DATASET.NAME:  # fail before anything runs, with a did-you-mean
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
