"""``result.json``: one record per run, written atomically by ``train.py``, read by the runner, the tables and mail.

One schema (``Record``, ``JobInfo``), version ``SCHEMA``::

    {"schema": 2, "status": "success|failed|cancelled|skipped", "created_at": "...",
     "job": {trainer, config, dataset, shots, subsample, seed, phase (train|eval), protocol (b2n|fewshot|xd),
             role (base|new|fewshot|source|target|variant), task, grid, grid_name, index, source, source_dataset,
             resumed_from_epoch, load_epoch},
     "metrics": {accuracy, error, macro_f1, per_class}, "cost": {...}, "method": {...}, "env": {...},
     "train": [{epoch, loss, loss_<term>..., acc, lr}, ...],
     "identity": {key: value, ...}, "identity_hash": "...", "config": {...full config...},
     "error": "...", "runner": {...}}

The job's place in a benchmark lives in the record itself, so any folder of records gives tables: the runner passes
``task``/``protocol``/``role``/``grid`` to ``train.py``; a hand-run job gets its protocol and role inferred from its
phase, class subsample and the run it evaluates (``infer_protocol_role``). ``source`` (eval jobs) is the trained run's
folder relative to the record's own folder, so a copied output tree keeps its links.

Records of schema 1 (no ``identity``, job fields partly in a ``job.json`` beside them) are read through
``Record.from_dict``: the job fields are completed from ``job.json`` and the identity is derived from the saved config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Any

import torch
from yacs.config import CfgNode

from vltune.fileio import atomic_write

SCHEMA = 2
PROTOCOLS = ("b2n", "fewshot", "xd")
ROLES = ("base", "new", "fewshot", "source", "target", "variant")


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return str(obj)


def read_record(path: str) -> dict[str, Any] | None:
    """The record at ``path`` as a dict, or None when it is missing or unreadable (a half-written file cannot
    exist)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def infer_protocol_role(phase: str, subsample: str, dataset: str, source_dataset: str = "",
                        variant_of: str = "") -> tuple[str, str]:
    """(protocol, role) of a job run by hand, from what it did.

    * training on the base classes → ``b2n``/``base``; evaluating on the new classes → ``b2n``/``new``;
    * evaluating another dataset's trained model → ``xd``/``variant`` when this dataset is a domain-shifted variant of
      the training dataset (``variant_of``, e.g. ImageNetV2 of ImageNet), else ``xd``/``target``;
    * a zero-shot evaluation of a variant dataset → ``xd``/``variant``;
    * everything else on all classes → ``fewshot``/``fewshot`` (its shots say which K).
    """
    if subsample == "base":
        return "b2n", "base"
    if subsample == "new":
        return "b2n", "new"
    if source_dataset and source_dataset != dataset:
        return "xd", "variant" if variant_of and variant_of == source_dataset else "target"
    if variant_of and phase == "eval":
        return "xd", "variant"
    return "fewshot", "fewshot"


@dataclass
class JobInfo:
    """What a record is a result of: the run and its place in a benchmark."""

    trainer: str = ""
    config: str = ""  # the trainer yaml's name (``vit_b16_ep50``)
    dataset: str = ""
    shots: int = 0
    subsample: str = "all"  # all | base | new
    seed: int = -1
    phase: str = "train"  # train (then test) | eval (--eval-only)
    protocol: str = ""  # b2n | fewshot | xd
    role: str = ""  # base | new | fewshot | source | target | variant
    task: str = ""  # the runner's task name; "" for a job run by hand
    grid: dict[str, Any] = field(default_factory=dict)  # grid-search point: config key -> value
    grid_name: str = ""
    index: int = -1  # position in the runner's pipeline (table order); -1 by hand
    source: str = ""  # eval jobs: the trained run's folder, relative to this record's folder
    source_dataset: str = ""  # eval jobs: the dataset the evaluated model was trained on
    resumed_from_epoch: int = 0
    load_epoch: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Record:
    """One run's result. ``to_dict``/``from_dict`` are the only (de)serialisers of ``result.json``."""

    status: str
    job: JobInfo
    metrics: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    #: per epoch this run trained (a resumed run: from where it resumed), the means of the logged step metrics:
    #: the total ``loss``, every loss term ``loss_<name>``, the method's other metrics (``acc``), and ``lr``
    train: list[dict[str, float]] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    identity_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    error: str = ""
    runner: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # where it was read from (not saved)
    schema: int = SCHEMA

    def problems(self) -> list[str]:
        """What makes this record unusable for tables ([] when nothing): wrong types where tables compute."""
        out = []
        if self.status not in ("success", "failed", "cancelled", "skipped"):
            out.append(f"status {self.status!r} is not success/failed/cancelled/skipped")
        for name in ("shots", "seed", "index"):
            if not isinstance(getattr(self.job, name), int) or isinstance(getattr(self.job, name), bool):
                out.append(f"job.{name} {getattr(self.job, name)!r} is not an integer")
        for name in ("trainer", "dataset", "protocol", "role", "task", "grid_name", "source"):
            if not isinstance(getattr(self.job, name), str):
                out.append(f"job.{name} {getattr(self.job, name)!r} is not a string")
        if self.job.protocol not in PROTOCOLS:
            out.append(f"job.protocol {self.job.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.status == "success" and not _is_number(self.metrics.get("accuracy")):
            out.append(f"metrics.accuracy {self.metrics.get('accuracy')!r} is not a number")
        for key, value in self.cost.items():
            if key.endswith(("_s", "_mb", "_params", "_bytes", "_per_s")) and value is not None and not _is_number(
                    value):
                out.append(f"cost.{key} {value!r} is not a number")
        return out

    @property
    def accuracy(self) -> float | None:
        """The test accuracy of a successful run, else None."""
        if self.status != "success" or "accuracy" not in self.metrics:
            return None
        return float(self.metrics["accuracy"])

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    def source_folder(self) -> str:
        """The evaluated run's folder (absolute), or "" for a job that evaluates no saved run."""
        if not self.job.source:
            return ""
        return os.path.normpath(os.path.join(self.folder, self.job.source))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        if not self.error:
            d.pop("error")
        if not self.runner:
            d.pop("runner")
        return {"schema": d.pop("schema"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str = "") -> Record:
        """A record from its JSON; schema-1 records are completed from the ``job.json`` beside them."""
        job = dict(d.get("job") or {})
        folder = os.path.dirname(path)
        if "protocol" not in job and folder:
            legacy = read_record(os.path.join(folder, "job.json")) or {}
            for key in ("task", "protocol", "role", "grid", "grid_name", "index"):
                if key in legacy and key not in job:
                    job[key] = legacy[key]
        if "phase" not in job and job.get("role"):
            job["phase"] = "train" if job["role"] in ("base", "fewshot", "source") else "eval"
        if job.get("source") and os.path.isabs(job["source"]) and folder:
            job["source"] = os.path.relpath(job["source"], folder)
        info = JobInfo.from_dict(job)
        if not info.protocol:
            info.protocol, info.role = infer_protocol_role(info.phase, info.subsample, info.dataset,
                                                           info.source_dataset)
        return cls(status=str(d.get("status", "")), job=info, metrics=d.get("metrics") or {},
                   cost=d.get("cost") or {}, method=d.get("method") or {}, train=d.get("train") or [],
                   env=d.get("env") or {},
                   identity=d.get("identity") or {}, identity_hash=d.get("identity_hash") or d.get("config_hash", ""),
                   config=d.get("config") or {}, created_at=d.get("created_at", ""), error=d.get("error", ""),
                   runner=d.get("runner") or {}, path=path, schema=int(d.get("schema", 1)))


def record_identity(record: Record) -> dict[str, Any]:
    """The record's identity: saved in it, or (schema 1) derived from its saved config the same way."""
    if record.identity:
        return record.identity
    from vltune.config.identity import identity_of_saved

    return identity_of_saved(record.config)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_record(path: str) -> Record | None:
    """The record at ``path`` (a ``result.json``), or None when missing or unreadable."""
    d = read_record(path)
    return Record.from_dict(d, path) if d is not None else None


def find_records(root: str, skipped: list[tuple[str, str]] | None = None) -> list[Record]:
    """Every ``result.json`` under ``root`` (any folder of runs: the runner's output, hand-run ``train.py`` jobs, or
    both), ordered by pipeline index, then by folder.

    A record that cannot be read (not JSON, not an object) or whose fields have the wrong types (``Record.problems``,
    also for the ``job.json`` a schema-1 record is completed from) is left out, so one damaged file never stops the
    tables; ``skipped`` (when given) receives ``(path, reason)`` for each.
    """
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if "result.json" not in files:
            continue
        path = os.path.join(folder, "result.json")
        reason = ""
        try:
            with open(path) as f:
                data = json.load(f)
            record = Record.from_dict(data, path) if isinstance(data, dict) else None
            if record is None:
                reason = f"not a JSON object ({type(data).__name__})"
            elif problems := record.problems():
                reason = "; ".join(problems)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            reason = f"unreadable: {e}"
        except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong shape (e.g. "job": [])
            reason = f"malformed: {type(e).__name__}: {e}"
        if reason:
            if skipped is not None:
                skipped.append((path, reason))
            continue
        out.append(record)
    out.sort(key=lambda r: (r.job.index < 0, r.job.index, r.path))
    return out


def config_to_dict(cfg: CfgNode) -> dict[str, Any]:
    """A plain, JSON-serialisable copy of a yacs config."""
    out = {}
    for k, v in cfg.items():
        out[k] = config_to_dict(v) if isinstance(v, CfgNode) else (list(v) if isinstance(v, tuple) else v)
    return out


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
