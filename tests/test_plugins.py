"""The library never imports its plugin packages (``trainers``, ``datasets``): the entry points load them once, through
``vltune.plugins.load_builtins()``, and a library call made before that fails naming the fix."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from conftest import REPO

from vltune.plugins import BUILTINS, load_builtins, plugin_packages


def _plugin_imports(path: str) -> list[str]:
    """``file:line`` of every import of a plugin package in ``path`` (at any depth: inside functions too)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        if any(n.split(".")[0] in BUILTINS for n in names):
            found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return found


def test_nothing_under_vltune_imports_the_plugin_packages():
    files = [os.path.join(d, f) for d, _, fs in os.walk(REPO / "vltune") for f in fs if f.endswith(".py")]
    assert len(files) > 50
    assert [hit for f in sorted(files) for hit in _plugin_imports(f)] == []


def test_the_library_alone_registers_nothing_and_names_the_fix():
    code = ("import sys, vltune.config, vltune.engine, vltune.runner.jobs, vltune.runner.schema, vltune.data.check, "
            "vltune.results\n"
            "print(sorted(m for m in ('trainers', 'datasets') if m in sys.modules))\n"
            "from vltune.config import get_cfg\n"
            "try:\n    get_cfg()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "from vltune.registry import DATASETS\n"
            "try:\n    DATASETS.get('Digits')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    env = {k: v for k, v in os.environ.items() if k != "VLTUNE_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "[]"
    assert lines[1].startswith("ConfigError no trainer is registered") and "load_builtins()" in lines[1]
    assert lines[2].startswith("RegistryError unknown dataset 'Digits': no dataset is registered")
    assert "load_builtins()" in lines[2]


def test_vltune_plugins_adds_packages_and_a_missing_one_is_named(monkeypatch):
    monkeypatch.setenv("VLTUNE_PLUGINS", "trainers, no_such_lab_package")
    assert plugin_packages() == ["datasets", "trainers", "no_such_lab_package"]
    with pytest.raises(ModuleNotFoundError, match=r"'no_such_lab_package' \(VLTUNE_PLUGINS=.*PYTHONPATH"):
        load_builtins()
