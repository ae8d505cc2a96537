"""Name → object registries for trainers, datasets and evaluators, keyed by Dassl's names.

A registry entry may carry metadata. Unknown names fail with a "did you mean" suggestion. A trainer's registration
carries everything the rest of vltune needs to know about the method, so adding one is one file plus one import line:

* ``add_config``: the function that creates the method's config node(s); the nodes it creates belong to the method
  (``TrainerRegistry``).
* ``family``: ``"prompt"``, ``"adapter"``, ``"finetune"``, ``"restuning"``, ``"zero-shot"``, … (tables group by it).
* ``test_overrides``: ``dict(trainable_params=N, opts={...}, ...)``, read by the registry-driven test matrix
  (``tests/test_trainers.py``); ``trainable_params`` is the count on the tiny test CLIP. ``opts`` (what the method
  needs on the tiny CLIP, e.g. a prompt depth it has) also serve the presets' smoke runs (``vltune.runner.smoke``).
* ``presets``: the paper preset's yaml per protocol (``vltune/runner/presets.py`` derives its table from it), keyed by
  ``PRESET_PROTOCOLS`` (``b2n``, ``xd``, ``fewshot``; ``dg`` evaluates the ``xd`` training, so it uses ``xd``'s
  entry). A value is a yaml name under ``configs/trainers/<Method>/`` (without ``.yaml``), a path to a ``.yaml``
  file (absolute, or relative to the repository root: a plugin's own yaml, or another method's), or, where the
  schedule depends on the shots, ``{shots: config}``.
* ``no_preset``: ``{protocol: reason}`` for each protocol without a preset, saying why (what the papers and
  repositories define, where that is written down). The presets print the reason when they leave the method out.
  A protocol may be in ``presets`` or in ``no_preset``, not both.
* ``eval_only``: ``True`` for a method that never trains (zero-shot); its preset jobs are evaluations.

Example::

    @TRAINERS.register("ProGrad", add_config=add_config, family="prompt",
                       test_overrides=dict(trainable_params=16 * 64),
                       presets=dict(b2n="vit_b16_ep100_ctx", xd="vit_b16_ep100_ctx"),
                       no_preset=dict(fewshot="ProGrad's official few-shot runs use RN50 ..."))
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from vltune.plugins import HINT


class RegistryError(KeyError, ValueError):
    """Unknown or duplicate registry name. A KeyError (Dassl's ``Registry.get``) and a ValueError (``build_*``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name → object map. ``register`` works as a decorator or as a direct call."""

    def __init__(self, name: str, plugin_hint: str = "") -> None:
        self.name = name
        self.plugin_hint = plugin_hint  # what to do when nothing is registered (the plugins were not loaded)
        self._objects: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self, name: str | Any | None = None, obj: Any = None, *, aliases: tuple[str, ...] = (), force: bool = False,
        **meta: Any,
    ) -> Callable[[Any], Any] | Any:
        """Register ``obj`` under ``name`` (default ``obj.__name__``).

        Usage: ``@REG.register()``, ``@REG.register("CoOp", add_config=fn)``, ``REG.register(obj=cls)`` or
        ``@REG.register`` (bare decorator).
        """
        if name is not None and not isinstance(name, str):  # bare decorator: @REG.register
            return self._add(name.__name__, name, aliases, force, meta)
        if obj is not None:
            return self._add(name or obj.__name__, obj, aliases, force, meta)

        def deco(o: Any) -> Any:
            return self._add(name or o.__name__, o, aliases, force, meta)

        return deco

    def _add(self, name: str, obj: Any, aliases: tuple[str, ...], force: bool, meta: dict[str, Any]) -> Any:
        for key in (name, *aliases):
            if not force and (key in self._objects or key in self._aliases):
                raise RegistryError(f"{self.name} registry: '{key}' is already registered; pass force=True to replace")
        self._objects[name] = obj
        self._meta[name] = dict(meta)
        for alias in aliases:
            self._aliases[alias] = name
        return obj

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases; raises with a suggestion when unknown."""
        if name in self._objects:
            return name
        if name in self._aliases:
            return self._aliases[name]
        if not self._objects and self.plugin_hint:
            raise RegistryError(f"unknown {self.name} {name!r}: no {self.name} is registered; {self.plugin_hint}")
        choices = sorted([*self._objects, *self._aliases])
        same_letters = [c for c in choices if c.lower() == str(name).lower()]  # 'coop' → 'CoOp' first
        close = same_letters + [c for c in difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
                                if c not in same_letters]
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(f"unknown {self.name} {name!r}{hint} Registered: {', '.join(sorted(self._objects))}")

    def get(self, name: str) -> Any:
        """The object registered under ``name`` (or an alias)."""
        return self._objects[self.canonical(name)]

    def meta(self, name: str) -> dict[str, Any]:
        """Metadata given at registration (e.g. ``add_config``, ``test_overrides``)."""
        return self._meta[self.canonical(name)]

    def registered_names(self) -> list[str]:
        """Canonical names, in registration order (aliases excluded)."""
        return list(self._objects)

    def __contains__(self, name: object) -> bool:
        return name in self._objects or name in self._aliases

    def __len__(self) -> int:
        return len(self._objects)


def mirror_into_dassl(registry: Registry, module: str, attr: str) -> bool:
    """When Dassl is installed, also register every entry in Dassl's own registry (e.g. ``dassl.engine``'s
    ``TRAINER_REGISTRY``), so Dassl's own ``train.py`` finds vltune's trainers and datasets. Returns whether it did.

    Dassl keys its registries by ``obj.__name__``; an entry registered under another name (an alias) is left out.
    """
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return False
    present = set(target.registered_names())
    for name in registry.registered_names():
        obj = registry.get(name)
        if obj.__name__ == name and name not in present:
            target.register(obj)
        elif obj.__name__ != name:
            logging.getLogger(__name__).debug(f"{name}: class name {obj.__name__} differs; not mirrored into Dassl")
    return True


#: the protocols a trainer's registration gives a preset entry or a reason for (``dg`` uses ``xd``'s entry: it
#: evaluates the cross-dataset ImageNet training on the ImageNet variants)
PRESET_PROTOCOLS = ("b2n", "xd", "fewshot")


def check_presets(name: str, meta: Mapping[str, Any]) -> None:
    """Validate the ``presets``, ``no_preset`` and ``eval_only`` metadata of trainer ``name`` (see the module
    docstring); raises ``RegistryError`` naming the trainer and the entry."""
    presets, reasons = meta.get("presets") or {}, meta.get("no_preset") or {}
    where = f"trainer {name!r}"
    for key, value in (("presets", presets), ("no_preset", reasons)):
        if not isinstance(value, Mapping):
            raise RegistryError(f"{where}: {key} must be a dict keyed by protocol, got {type(value).__name__}")
        unknown = [p for p in value if p not in PRESET_PROTOCOLS]
        if unknown:
            hint = "; dg uses xd's entry" if "dg" in unknown else ""
            raise RegistryError(f"{where}: {key} has unknown protocol(s) {unknown}; choose from "
                                f"{', '.join(PRESET_PROTOCOLS)}{hint}")
    both = [p for p in presets if p in reasons]
    if both:
        raise RegistryError(f"{where}: {both} in both presets and no_preset; give a config or a reason, not both")
    for protocol, config in presets.items():
        configs = config.values() if isinstance(config, Mapping) else [config]
        shots_ok = not isinstance(config, Mapping) or (config and all(
            isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in config))
        if not shots_ok or not all(isinstance(c, str) and c.strip() for c in configs):
            raise RegistryError(f"{where}: presets[{protocol!r}] must be a yaml name or path, or a non-empty "
                                f"{{shots: yaml}} dict with positive int shots, got {config!r}")
    for protocol, reason in reasons.items():
        if not isinstance(reason, str) or not reason.strip():
            raise RegistryError(f"{where}: no_preset[{protocol!r}] must say why there is no {protocol} preset, got "
                                f"{reason!r}")
    if not isinstance(meta.get("eval_only", False), bool):
        raise RegistryError(f"{where}: eval_only must be True or False, got {meta['eval_only']!r}")


class ConfigOwnershipError(RegistryError):
    """A trainer's ``add_config`` creates or alters a config node that another trainer (or vltune) owns."""


class TrainerRegistry(Registry):
    """Trainers, and the config nodes each one owns; registration also validates the preset metadata
    (``check_presets``).

    A trainer's ``add_config`` (registration metadata) creates its nodes: every node or key it adds to the defaults is
    owned by that trainer (trainers registered with the same ``add_config`` function share it). Registration fails when
    ``add_config`` creates or alters a node owned by another trainer, or changes a default of vltune's own keys, naming
    both trainers and the node, so one method can never silently replace another's settings.
    """

    def __init__(self, name: str, plugin_hint: str = "") -> None:
        super().__init__(name, plugin_hint)
        self._owners: dict[str, tuple[str, Any]] = {}  # unit ("TRAINER.COOP", "OPTIM.LR_EXP") -> (trainer, add_config)
        self._owned: dict[str, tuple[str, ...]] = {}

    def _add(self, name: str, obj: Any, aliases: tuple[str, ...], force: bool, meta: dict[str, Any]) -> Any:
        check_presets(name, meta)
        add_config = meta.get("add_config")
        units = self._claims(name, add_config) if add_config is not None else ()
        obj = super()._add(name, obj, aliases, force, meta)
        for unit in units:
            if unit not in self._owners or self._owners[unit][0] == name:
                self._owners[unit] = (name, add_config)
        self._owned[name] = units
        return obj

    def unregister(self, name: str) -> None:
        """Remove trainer ``name``, its aliases and its ownership of config nodes (tests register throwaway
        trainers)."""
        name = self.canonical(name)
        del self._objects[name], self._meta[name]
        self._aliases = {a: n for a, n in self._aliases.items() if n != name}
        self._owned.pop(name, None)
        for unit in [u for u, (owner, _) in self._owners.items() if owner == name]:
            fn = self._owners.pop(unit)[1]
            heir = next((n for n, units in self._owned.items()
                         if unit in units and self._meta[n].get("add_config") is fn), None)
            if heir is not None:
                self._owners[unit] = (heir, fn)

    def _claims(self, name: str, add_config: Callable[[Any], None]) -> tuple[str, ...]:
        """The config units ``add_config`` creates; raises when it touches a unit another trainer or vltune owns.

        ``add_config`` runs on the defaults extended by every other registered trainer's nodes, so a redefinition
        (a node object replaced) and an in-place change of another trainer's node both show up.
        """
        from vltune.config.defaults import get_cfg_default
        from vltune.config.nodes import config_units, flat_keys

        shared_with = [unit for unit, (owner, fn) in self._owners.items() if fn is add_config and owner != name]
        if shared_with:  # a variant registered with its family's add_config (e.g. DePT over several bases)
            return tuple(shared_with)
        cfg = get_cfg_default()
        core = flat_keys(cfg)
        for fn in dict.fromkeys(fn for owner, fn in self._owners.values() if owner != name):
            fn(cfg)
        before = flat_keys(cfg)
        nodes = {unit: _node(cfg, unit) for unit, (owner, _) in self._owners.items() if owner != name}
        add_config(cfg)
        after = flat_keys(cfg)
        for unit, (owner, fn) in self._owners.items():
            if owner == name:
                continue
            keys = [k for k in {*before, *after} if k == unit or k.startswith(unit + ".")]
            replaced = nodes[unit] is not None and _node(cfg, unit) is not nodes[unit]
            if replaced or any(before.get(k, _MISSING) != after.get(k, _MISSING) for k in keys):
                raise ConfigOwnershipError(
                    f"trainer {name!r}: its add_config {'redefines' if replaced else 'alters'} {unit}, which trainer "
                    f"{owner!r} owns ({_where(fn)}); give {name} a node of its own (e.g. TRAINER.{name.upper()}), "
                    f"and list {unit} in the trainer class's config_reads if it reads it")
        units = config_units(before, after)
        for unit, kind in units.items():
            if kind == "changed":
                raise ConfigOwnershipError(
                    f"trainer {name!r}: its add_config changes {unit}, which vltune's defaults own"
                    f"{'' if unit in core else ' (or another trainer)'}; set it in the trainer's yaml files instead")
        return tuple(units)

    def owned_units(self, name: str) -> tuple[str, ...]:
        """The config nodes and keys trainer ``name`` created through its ``add_config``."""
        return self._owned[self.canonical(name)]

    def owner(self, unit: str) -> str | None:
        """The trainer that owns config unit ``unit`` (first registered, for a shared ``add_config``), or None."""
        owner = self._owners.get(unit)
        return owner[0] if owner else None

    def owners(self) -> dict[str, str]:
        """``{unit: owning trainer}`` for every config unit a trainer created."""
        return {unit: owner for unit, (owner, _) in self._owners.items()}


_MISSING = object()


def _node(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part) if hasattr(cfg, "get") else None
        if cfg is None:
            return None
    return cfg if hasattr(cfg, "items") else None


def _where(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


TRAINERS = TrainerRegistry("trainer", plugin_hint=HINT)
DATASETS = Registry("dataset", plugin_hint=HINT)
EVALUATORS = Registry("evaluator")
