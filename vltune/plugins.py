"""The plugin packages: where the registered methods and datasets come from.

vltune's library never imports its plugins. The packages ``datasets`` and ``trainers`` (in the repository root)
register the CoOp datasets and the methods when imported; the entry points (``train.py``, ``parallel_runner.py``,
the ``python -m vltune.*`` commands, the tests) call ``load_builtins()`` once, before anything looks a name up.

``VLTUNE_PLUGINS`` names more packages to import the same way (space or comma separated), e.g. a lab's own methods
kept outside this repository: ``VLTUNE_PLUGINS=mylab_methods python train.py --trainer MyMethod ...``. The runner's
jobs inherit the variable, so a suite runs them too.
"""

from __future__ import annotations

import importlib
import os
import re

#: the packages shipped with vltune, imported in this order (trainers' configs may name datasets)
BUILTINS = ("datasets", "trainers")
ENV = "VLTUNE_PLUGINS"
HINT = ("load the plugin packages first: vltune.plugins.load_builtins() (train.py, parallel_runner.py, the python -m "
        "commands and the tests call it)")


def plugin_packages() -> list[str]:
    """``BUILTINS`` then the packages ``VLTUNE_PLUGINS`` names, without repeats."""
    extra = [p for p in re.split(r"[\s,]+", os.environ.get(ENV, "")) if p]
    return list(dict.fromkeys([*BUILTINS, *extra]))


def load_builtins() -> list[str]:
    """Import every plugin package (a no-op for those already imported); returns their names.

    A package that cannot be found fails naming it and where it was asked for.
    """
    names = plugin_packages()
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            where = f"{ENV}={os.environ.get(ENV, '')!r}" if name not in BUILTINS else "vltune's BUILTINS"
            raise ModuleNotFoundError(f"plugin package {name!r} ({where}) is not importable: run from the "
                                      "repository root or put its folder on PYTHONPATH", name=name) from e
    return names
