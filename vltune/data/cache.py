"""Where vltune writes derived data (split files rebuilt from raw sources, few-shot draws), and how it reads them back.

Never inside a read-only data root (upstream mkdirs ``split_fewshot`` there): the data root when writable, else
``$VLTUNE_CACHE_DIR`` (default ``~/.cache/vltune``). Few-shot draws are JSON with paths relative to the image folder
and the sha256 of the split they were drawn from; Dassl's ``split_fewshot/*.pkl`` files are still read, through the
allow-list unpickler, with their absolute paths re-rooted onto this machine.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable

from vltune.data.datum import Datum, load_legacy_pickle
from vltune.data.splits import _strip
from vltune.fileio import atomic_write

logger = logging.getLogger(__name__)


def cache_root() -> str:
    """``$VLTUNE_CACHE_DIR`` or ``~/.cache/vltune``; used when the data root is read-only."""
    return os.path.abspath(os.path.expanduser(os.environ.get("VLTUNE_CACHE_DIR") or "~/.cache/vltune"))


def _is_writable(path: str) -> bool:
    """Whether files can be created in ``path``, or ``path`` can be created in a writable existing parent."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK)


def writable_dir(dataset_path: str, sub: str, kind: str) -> str:
    """``<dataset_path>/<sub>`` when the data root allows it, else ``<cache_root>/<kind>/<dataset dir name>``.

    The folder is created; nothing is ever created inside a read-only data root.
    """
    for folder in (os.path.join(dataset_path, sub), os.path.join(cache_root(), kind, os.path.basename(dataset_path))):
        if _is_writable(folder):
            try:
                os.makedirs(folder, exist_ok=True)
                return folder
            except OSError:
                continue
    raise PermissionError(f"neither {dataset_path} nor {cache_root()} is writable; set VLTUNE_CACHE_DIR")


def reroot(impath: str, image_path: str, dataset_path: str) -> str | None:
    """Map an absolute path from another machine onto ``image_path``, or None if it is not under a matching folder.

    The relative part is what follows the last ``<dataset dir name>/<image dir>`` in the old path.
    """
    marker = os.path.relpath(image_path, os.path.dirname(dataset_path)).split(os.sep)
    parts = [p for p in re.split(r"[\\/]", impath) if p]
    for i in range(len(parts) - len(marker), -1, -1):
        if parts[i : i + len(marker)] == marker and i + len(marker) < len(parts):
            return os.path.join(image_path, *parts[i + len(marker) :])
    return None


def fewshot_name(num_shots: int, seed: int) -> str:
    return f"shot_{num_shots}-seed_{seed}"


def _legacy_fewshot(path: str, image_path: str, dataset_path: str, known: dict[str, int]) -> dict | None:
    """A Dassl few-shot pickle re-rooted onto this machine, or None if it does not match the current split."""
    data = load_legacy_pickle(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        logger.warning(f"Ignoring {path}: not a Dassl few-shot pickle")
        return None
    out = {}
    for key, items in data.items():
        out[key] = []
        for d in items:
            new = reroot(d.impath, image_path, dataset_path) if isinstance(d, Datum) else None
            if new is None or known.get(new) != d.label:
                logger.warning(f"Ignoring {path}: {getattr(d, 'impath', d)!r} is not in the current split; re-drawing")
                return None
            out[key].append(Datum(new, d.label, d.domain, d.classname))
    return out


def load_fewshot_cache(
    dataset_path: str, image_path: str, num_shots: int, seed: int, split_sha256: str, known: Iterable[Datum]
) -> dict[str, list[Datum]] | None:
    """A cached few-shot draw ``{"train": [...], "val": [...]}`` (val absent for ImageNet), or None.

    Order: Dassl's ``<dataset>/split_fewshot/shot_K-seed_S.pkl`` (restricted unpickler; absolute paths re-rooted and
    checked against ``known``, the current train+val), then vltune's JSON cache in ``split_fewshot/`` and in the
    cache dir. A JSON cache drawn from a different split (sha256 mismatch) is ignored.
    """
    name = fewshot_name(num_shots, seed)
    legacy = os.path.join(dataset_path, "split_fewshot", name + ".pkl")
    if os.path.isfile(legacy):
        data = _legacy_fewshot(legacy, image_path, dataset_path, {d.impath: d.label for d in known})
        if data is not None:
            logger.info(f"Loading preprocessed few-shot data from {legacy}")
            return data
    for folder in (
        os.path.join(dataset_path, "split_fewshot"),
        os.path.join(cache_root(), "fewshot", os.path.basename(dataset_path)),
    ):
        path = os.path.join(folder, name + ".json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            obj = json.load(f)
        if obj.get("split_sha256") != split_sha256:
            logger.info(f"Ignoring {path}: drawn from another version of the split")
            continue
        logger.info(f"Loading preprocessed few-shot data from {path}")
        return {
            k: [Datum(os.path.join(image_path, p), int(y), classname=c) for p, y, c in obj[k]]
            for k in ("train", "val")
            if k in obj
        }
    return None


def save_fewshot_cache(
    dataset_path: str, image_path: str, num_shots: int, seed: int, split_sha256: str, data: dict[str, list[Datum]]
) -> str | None:
    """Write the draw as JSON (paths relative to ``image_path``) to ``split_fewshot/`` or the cache dir.

    Never a pickle; returns the path written, or None when no location is writable.
    """
    try:
        folder = writable_dir(dataset_path, "split_fewshot", "fewshot")
    except PermissionError as e:
        logger.warning(f"Few-shot draw not cached: {e}")
        return None
    path = os.path.join(folder, fewshot_name(num_shots, seed) + ".json")
    logger.info(f"Saving preprocessed few-shot data to {path}")
    obj = {
        "num_shots": num_shots,
        "seed": seed,
        "split_sha256": split_sha256,
        **{k: [(_strip(d.impath, image_path), d.label, d.classname) for d in v] for k, v in data.items()},
    }
    atomic_write(path, json.dumps(obj, indent=1).encode())
    return path
