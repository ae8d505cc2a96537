"""Pure functions for split files, split builders, few-shot draws and base/new subsampling.

Upstream keeps these as static methods of ``OxfordPets`` and ``DescribableTextures`` (CoOp ``datasets/*.py``) and
draws with the global ``random``; here every random function takes an explicit ``random.Random``. Seeded with the
run's SEED and used in Dassl's order (split builders, then train few-shot, then val few-shot), it reproduces
Dassl's picks exactly, because a fresh ``random.Random(s)`` has the same state as ``random.seed(s)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Iterable, Sequence

from vltune.data.datum import Datum
from vltune.fileio import atomic_write

logger = logging.getLogger(__name__)

Split = tuple[list[Datum], list[Datum], list[Datum]]


def listdir_nohidden(path: str, sort: bool = True) -> list[str]:
    """Entries of ``path`` not starting with a dot; sorted by default (upstream order depends on the filesystem)."""
    items = [f for f in os.listdir(path) if not f.startswith(".")]
    return sorted(items) if sort else items


def list_dirs(path: str) -> list[str]:
    """Sorted non-hidden sub-folders of ``path`` (files such as ImageNet-A's README.txt are skipped)."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def folder_items(folder: str, label: int, classname: str) -> list[Datum]:
    """One Datum per non-hidden file of ``folder``, sorted by name."""
    return [Datum(os.path.join(folder, n), label, classname=classname) for n in listdir_nohidden(folder)]


def read_classnames(path: str) -> dict[str, str]:
    """``classnames.txt`` of the ImageNet family: ``<wnid> <name with spaces>`` per line, file order kept."""
    out: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            wnid, _, name = line.strip().partition(" ")
            if wnid:
                out[wnid] = name
    return out


def _strip(impath: str, prefix: str) -> str:
    if prefix:
        impath = impath.removeprefix(prefix)
    return impath.removeprefix("/")


def dump_split(train: Sequence[Datum], val: Sequence[Datum], test: Sequence[Datum], prefix: str) -> bytes:
    """The split JSON bytes exactly as Dassl writes them (``indent=4, separators=(",", ": ")``, no newline)."""
    obj = {
        k: [(_strip(d.impath, prefix), d.label, d.classname) for d in v]
        for k, v in (("train", train), ("val", val), ("test", test))
    }
    return json.dumps(obj, indent=4, separators=(",", ": ")).encode()


def save_split(train: Sequence[Datum], val: Sequence[Datum], test: Sequence[Datum], path: str, prefix: str) -> bytes:
    """Write a ``split_zhou_*.json`` with paths relative to ``prefix``; returns the bytes written."""
    data = dump_split(train, val, test, prefix)
    atomic_write(path, data)
    logger.info(f"Saved split to {path}")
    return data


class SplitFileError(ValueError):
    """A split JSON that cannot be used: cut, not JSON, wrong shape, or a label/class-name clash; names the file."""


#: what to do about an unusable split file (CoOp's splits are published; the builders make different ones)
SPLIT_FILE_ADVICE = (
    "replace it with CoOp's original split file (download: CoOp's DATASETS.md), or delete it so that a dataset "
    "with raw annotation files rebuilds it (a rebuilt split is not CoOp's: results are not comparable)"
)


def read_split(path: str, prefix: str) -> Split:
    """Read a ``split_zhou_*.json``; paths are joined to ``prefix`` and labels cast to int.

    Raises ``SplitFileError`` naming ``path`` when the file is cut or malformed, or when one label carries two class
    names or one class name two labels (``check_label_names``): either would silently train on wrong labels.
    """
    logger.info(f"Reading split from {path}")
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        size = os.path.getsize(path)
        raise SplitFileError(
            f"split file {path} ({size:,} bytes) is not valid JSON ({err}); it is probably cut short by an "
            f"interrupted download or copy: {SPLIT_FILE_ADVICE}"
        ) from err
    try:
        out = tuple(
            [Datum(os.path.join(prefix, p), int(y), classname=c) for p, y, c in obj[k]]
            for k in ("train", "val", "test")
        )
    except (KeyError, TypeError, ValueError) as err:
        raise SplitFileError(
            f'split file {path} is not a CoOp split (expected {{"train"|"val"|"test": [[path, label, '
            f"classname], ...]}}; {type(err).__name__}: {err}): {SPLIT_FILE_ADVICE}"
        ) from err
    check_label_names(out, path)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def check_label_names(split: Split, source: str) -> None:
    """Raise ``SplitFileError`` when a label has two class names or a class name two labels in ``split``.

    ``source`` (the split file) is named in the message with both names or labels and the first entry of each, so
    the wrong line can be found.
    """
    names: dict[int, tuple[str, str]] = {}  # label -> (class name, "<part> entry <path>" where it first appears)
    labels: dict[str, tuple[int, str]] = {}
    for part, items in zip(("train", "val", "test"), split):
        for d in items:
            where = f"{part} entry {d.impath}"
            name, name_at = names.setdefault(d.label, (d.classname, where))
            if name != d.classname:
                raise SplitFileError(
                    f"split file {source}: label {d.label} has two class names, {name!r} ({name_at}) and "
                    f"{d.classname!r} ({where}): {SPLIT_FILE_ADVICE}"
                )
            label, label_at = labels.setdefault(d.classname, (d.label, where))
            if label != d.label:
                raise SplitFileError(
                    f"split file {source}: class name {d.classname!r} has two labels, {label} ({label_at}) and "
                    f"{d.label} ({where}): {SPLIT_FILE_ADVICE}"
                )


def classes_missing_from(items: Sequence[Datum], *others: Sequence[Datum]) -> list[tuple[int, str]]:
    """``(label, classname)`` of every class with no item in ``items``, sorted by label.

    The classes are the labels of ``items`` and ``others`` and every label below their maximum (a gap is a class
    too: Dassl counts ``max(label) + 1`` classes); a class seen in no list gets the name "".
    """
    known: dict[int, str] = {}
    for d in (d for group in (items, *others) for d in group):
        known.setdefault(d.label, d.classname)
    present = {d.label for d in items}
    top = max(known, default=-1)
    return [(c, known.get(c, "")) for c in range(top + 1) if c not in present]


def _group(items: Iterable[Datum]) -> dict[int, list[Datum]]:
    groups: dict[int, list[Datum]] = {}  # insertion order = first appearance, as Dassl's split_dataset_by_label
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return groups


def split_trainval(trainval: Sequence[Datum], p_val: float, rng: random.Random) -> tuple[list[Datum], list[Datum]]:
    """Per label (first-appearance order): shuffle, then ``round(n * p_val)`` items go to val, the rest to train."""
    train, val = [], []
    for label, items in _group(trainval).items():
        n_val = round(len(items) * p_val)
        if n_val < 1:
            raise ValueError(f"class {label} has {len(items)} train+val images; too few for a {p_val:.0%} val split")
        items = list(items)
        rng.shuffle(items)
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def split_items(items: list, p_trn: float, p_val: float, rng: random.Random) -> tuple[list, list, list]:
    """Shuffle one class's items and cut ``round(n*p_trn)`` train, ``round(n*p_val)`` val, the rest test."""
    items = list(items)
    rng.shuffle(items)
    n_trn, n_val = round(len(items) * p_trn), round(len(items) * p_val)
    if min(n_trn, n_val, len(items) - n_trn - n_val) < 1:
        raise ValueError(f"{len(items)} images are too few for a {p_trn:.0%}/{p_val:.0%}/rest split")
    return items[:n_trn], items[n_trn : n_trn + n_val], items[n_trn + n_val :]


def read_and_split_data(
    image_dir: str,
    p_trn: float,
    p_val: float,
    ignored: Sequence[str] = (),
    new_cnames: dict[str, str] | None = None,
    rng: random.Random | None = None,
) -> Split:
    """Class folders of ``image_dir`` (sorted, minus ``ignored``), label = index, split per class with ``split_items``.

    Image names are sorted before shuffling (upstream shuffles the raw ``os.listdir`` order).
    """
    rng = rng or random.Random()
    categories = [c for c in listdir_nohidden(image_dir) if c not in ignored]
    out: Split = ([], [], [])
    for label, category in enumerate(categories):
        folder = os.path.join(image_dir, category)
        cname = (new_cnames or {}).get(category, category)
        parts = split_items(listdir_nohidden(folder), p_trn, p_val, rng)
        for dst, names in zip(out, parts):
            dst += [Datum(os.path.join(folder, n), label, classname=cname) for n in names]
    return out


def generate_fewshot(items: Sequence[Datum], num_shots: int, rng: random.Random, repeat: bool = False) -> list[Datum]:
    """K items per label, labels in first-appearance order: ``rng.sample(items, K)``, or all items if fewer than K.

    With ``repeat`` a short class is padded by ``rng.choices`` (Dassl's ``repeat=True``). Called on train with K, then
    on val with ``min(K, 4)`` with the same ``rng = random.Random(SEED)``, the picks equal Dassl's pickles whenever
    the split JSON already exists (nothing else consumes ``random`` before the draw).
    """
    if num_shots < 1:
        return list(items)
    out: list[Datum] = []
    for group in _group(items).values():
        if len(group) >= num_shots:
            out += rng.sample(group, num_shots)
        else:
            out += rng.choices(group, k=num_shots) if repeat else group
    return out


def subsample_classes(*lists: Sequence[Datum], subsample: str = "all") -> tuple[list[Datum], ...]:
    """Keep the first ``ceil(C/2)`` labels of the FIRST list ("base") or the rest ("new"), relabelled from 0."""
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"DATASET.SUBSAMPLE_CLASSES must be all, base or new; got {subsample!r}")
    if subsample == "all":
        return tuple(list(x) for x in lists)
    labels = sorted({d.label for d in lists[0]})
    if not labels:
        raise ValueError("subsample_classes: the first list is empty")
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}
    logger.info(f"SUBSAMPLE {subsample.upper()} CLASSES!")
    return tuple([Datum(d.impath, relabel[d.label], 0, d.classname) for d in x if d.label in relabel] for x in lists)
