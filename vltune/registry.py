"""Name → object registries for trainers, datasets and evaluators, keyed by Dassl's names.

A registry entry may carry metadata (for trainers: the ``add_config`` function that defines the method's config node,
and ``test_overrides`` used by the registry-driven test matrix). Unknown names fail with a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable
from typing import Any


class RegistryError(KeyError, ValueError):
    """Unknown or duplicate registry name. A KeyError (Dassl's ``Registry.get``) and a ValueError (``build_*``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name → object map. ``register`` works as a decorator or as a direct call."""

    def __init__(self, name: str) -> None:
        self.name = name
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


TRAINERS = Registry("trainer")
DATASETS = Registry("dataset")
EVALUATORS = Registry("evaluator")
