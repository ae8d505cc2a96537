"""Checkpoint files in Dassl's layout, written atomically and read without executing pickled code.

Layout: ``<dir>/<registered name>/model.pth.tar-<epoch>`` plus a text file ``checkpoint`` naming the newest file.
A state holds ``state_dict`` (trainable tensors only), ``epoch`` (1-based), ``optimizer``, ``scheduler`` (plain
numbers) and ``val_result``, so vltune's own files load with ``torch.load(weights_only=True)``. vltune also
records the writer: ``trainer`` (``TRAINER.NAME``) and ``trainer_config`` (the values of the config nodes the trainer
owns or reads, e.g. ``TRAINER.COOP.N_CTX``), so another trainer's file is refused instead of silently loaded into
modules of the same name and shape; files without these keys (older vltune, Dassl) still load. Files written by
upstream Dassl pickle scheduler objects; those are read with an allow-list unpickler that rebuilds tensors and turns
every other class into an inert placeholder, so reading a user's old checkpoint never runs code from it.

A file that cannot be read (truncated, damaged) raises ``CorruptCheckpointError`` naming it, so resume can fall back
to an older intact file and an explicit load can say which file is broken.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from typing import Any

import torch
import yaml

from vltune.fileio import atomic_write

logger = logging.getLogger(__name__)

BEST = "model-best.pth.tar"
_EPOCH_FILE = re.compile(r"^model\.pth\.tar-(\d+)$")
#: what reading a truncated or damaged file raises inside ``torch.load`` (zip reader, pickle, unpickled garbage)
_READ_ERRORS = (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
                pickle.UnpicklingError, zipfile.BadZipFile, struct.error, UnicodeDecodeError)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read; ``path`` names it."""

    def __init__(self, path: str, cause: BaseException) -> None:
        reason = (str(cause).strip().splitlines() or [""])[0]
        super().__init__(f"corrupt checkpoint {path}: {type(cause).__name__}: {reason or 'no data'} "
                         "(the file is truncated or damaged)")
        self.path = path


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(state: dict[str, Any], directory: str, is_best: bool = False) -> str:
    """Write ``model.pth.tar-<state['epoch']>`` and point ``checkpoint`` at it, or only ``model-best.pth.tar`` when
    ``is_best``; return the path written."""
    fpath = os.path.join(directory, BEST if is_best else f"model.pth.tar-{state['epoch']}")
    atomic_torch_save(state, fpath)
    if not is_best:
        atomic_write(os.path.join(directory, "checkpoint"), (os.path.basename(fpath) + "\n").encode())
    logger.info(f"Checkpoint saved to {fpath}")
    return fpath


def saved_epochs(directory: str) -> list[int]:
    """Epoch suffixes of the ``model.pth.tar-N`` files in ``directory``, ascending."""
    found = (_EPOCH_FILE.match(os.path.basename(p)) for p in glob.glob(os.path.join(directory, "model.pth.tar-*")))
    return sorted(int(m.group(1)) for m in found if m)


def resolve_checkpoint(directory: str, epoch: int | None = None) -> str:
    """The file for ``epoch`` in ``directory``: None → ``model-best.pth.tar``, -1 → the newest epoch, N → epoch N."""
    if epoch is None:
        path = os.path.join(directory, BEST)
    else:
        epochs = saved_epochs(directory)
        if epoch < 0 and epochs:
            epoch = epochs[-1]
        path = os.path.join(directory, f"model.pth.tar-{epoch}")
    if not os.path.isfile(path):
        have = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        raise FileNotFoundError(
            f"checkpoint not found: {path} (folder holds: {', '.join(have) or 'nothing'}); "
            "pass --load-epoch N for model.pth.tar-N, or -1 for the newest"
        )
    return path


class _Inert:
    """Stands in for any class a legacy checkpoint names outside the allow-list; it only stores what it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _allowed(module: str, name: str) -> bool:
    if module == "collections" and name == "OrderedDict":
        return True
    if module.split(".")[0] != "torch":
        return False
    if name.startswith("_rebuild") or name.endswith("Storage"):
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, type(torch.Size)))


class _LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _allowed(module, name):
            return super().find_class(module, name)
        return _Inert


class _legacy_pickle:  # noqa: N801  (a module-like namespace for torch.load's pickle_module)
    Unpickler = _LegacyUnpickler
    load = pickle.load
    __name__ = "vltune_legacy_pickle"


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint: ``weights_only`` first; upstream files with pickled objects via the allow-list unpickler.

    Raises ``CorruptCheckpointError`` naming ``path`` when neither way can read the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            state = torch.load(path, map_location=map_location, weights_only=False, pickle_module=_legacy_pickle)
            logger.info(f"{path} holds pickled objects (an upstream Dassl checkpoint); read tensors only")
            return state
    except torch.cuda.OutOfMemoryError:
        raise
    except _READ_ERRORS as e:
        raise CorruptCheckpointError(path, e) from e


def module_folders(directory: str) -> list[str]:
    """The sub-folders of a run folder that hold checkpoints (its registered module names), sorted."""
    if not os.path.isdir(directory):
        return []
    return sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d))
                  and (saved_epochs(os.path.join(directory, d)) or os.path.isfile(os.path.join(directory, d, BEST))))


def run_trainer(directory: str) -> str | None:
    """The trainer a run folder was made by, from its ``result.json`` (``job.trainer``) or ``config.yaml``
    (``TRAINER.NAME``); None when neither says (a Dassl folder, a hand-copied one)."""
    try:
        with open(os.path.join(directory, "result.json")) as f:
            name = (json.load(f).get("job") or {}).get("trainer")
        if name:
            return str(name)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with open(os.path.join(directory, "config.yaml")) as f:
            name = ((yaml.safe_load(f) or {}).get("TRAINER") or {}).get("NAME")
        return str(name) if name else None
    except (OSError, yaml.YAMLError, AttributeError):
        return None
