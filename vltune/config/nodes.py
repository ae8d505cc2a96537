"""Flat views of yacs configs: ``{"OPTIM.LR": 0.002, ...}``, and the config *units* a trainer's ``add_config``
creates (a new node such as ``TRAINER.COOP``, or a single new key in an existing node such as ``OPTIM.LR_EXP``).

Units are what trainers own (``vltune.registry.TrainerRegistry``) and what a job's identity is scoped to
(``vltune.config.identity``).
"""

from __future__ import annotations

from typing import Any

from yacs.config import CfgNode as CN


def flat_keys(cfg: CN | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"OPTIM.LR": 0.002, ...}`` for every leaf of a yacs config or of a plain nested dict (a config saved in
    result.json)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # CfgNode is a dict
            out.update(flat_keys(v, key + "."))
        else:
            out[key] = v
    return out


def node_paths(keys: dict[str, Any]) -> set[str]:
    """Every node path of a flat config (``OPTIM``, ``TRAINER.COOP``, …), leaves excluded."""
    return {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}


def config_units(defaults: dict[str, Any], extended: dict[str, Any]) -> dict[str, str]:
    """The units an ``add_config`` created or changed, from the flat defaults and the flat config after it ran.

    ``{unit: "new"}`` for a node or key the defaults lack (the outermost missing node: ``TRAINER.COOP`` for
    ``TRAINER.COOP.N_CTX``; the key itself for ``OPTIM.LR_EXP``), ``{key: "changed"}`` for a default key whose value
    changed or that was removed.
    """
    nodes = node_paths(defaults)
    units: dict[str, str] = {}
    for key in extended:
        if key in defaults:
            if extended[key] != defaults[key]:
                units[key] = "changed"
            continue
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in nodes:
                units.setdefault(prefix, "new")
                break
    for key in defaults:
        if key not in extended:
            units[key] = "changed"
    return units


def under(key: str, units: tuple[str, ...] | list[str] | set[str]) -> bool:
    """Whether ``key`` is one of ``units`` or lies inside one of them."""
    return any(key == u or key.startswith(u + ".") for u in units)
