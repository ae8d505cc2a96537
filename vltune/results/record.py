"""``result.json``: one record per run, written atomically, read by the runner and the table builders.

Shape (ARCHITECTURE.md): ``schema, status, created_at, job{trainer, config, dataset, shots, subsample, seed, phase,
source}, metrics{accuracy, error, macro_f1, per_class}, cost{...}, env{...}, config_hash, config{...}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from typing import Any

import torch
from yacs.config import CfgNode

from vltune.fileio import atomic_write

SCHEMA = 1
# Keys that do not change what a run computes: where it writes, where the data sits, how chatty it is.
_HASH_EXCLUDED = ("OUTPUT_DIR", "RESUME", "DATASET.ROOT", "VERBOSE", "TRAIN.PRINT_FREQ", "DATALOADER.NUM_WORKERS")


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_record(path: str) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is missing or unreadable (a half-written file cannot exist)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def config_to_dict(cfg: CfgNode) -> dict[str, Any]:
    """A plain, JSON-serialisable copy of a yacs config."""
    out = {}
    for k, v in cfg.items():
        out[k] = config_to_dict(v) if isinstance(v, CfgNode) else (list(v) if isinstance(v, tuple) else v)
    return out


def config_hash(cfg: CfgNode) -> str:
    """sha256 of the config without the keys that do not change the computation (see ``_HASH_EXCLUDED``)."""
    d = config_to_dict(cfg)
    for key in _HASH_EXCLUDED:
        node, *rest = key.split(".")
        if rest:
            d.get(node, {}).pop(rest[0], None)
        else:
            d.pop(node, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _git_sha() -> tuple[str, bool | None]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "", None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware of this run."""
    import open_clip

    import vltune

    sha, dirty = _git_sha()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"vltune": vltune.__version__, "git_sha": sha, "dirty": dirty, "torch": torch.__version__,
            "cuda": torch.version.cuda, "open_clip": open_clip.__version__, "python": platform.python_version(),
            "device": str(device), "gpu": gpu}
