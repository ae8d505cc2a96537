"""Is a data root ready for the benchmarks? ``python -m vltune.data check --root DIR [--dataset NAME ...]``.

For each of the 15 CoOp datasets (or the named ones): whether its folder is there, where its split comes from (the
``split_zhou_*.json``, the cache, or raw annotations it can be rebuilt from), the images per split against the
published counts (dassl_contract.md §9; a mismatch is a warning: another split version), whether every listed image
exists and decodes, and whether any class has no images. Anything unusable is reported with the file and what to do;
the exit status is 1 when a requested dataset is unusable (absent included), 0 otherwise. Nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from PIL import Image

from vltune.data import splits
from vltune.data.base import CoOpDataset
from vltune.data.datum import Datum
from vltune.registry import DATASETS

#: the 15 benchmark datasets → published (classes, train, val, test); test-only datasets have test only
PUBLISHED: dict[str, tuple[int, int, int, int]] = {
    "ImageNet": (1000, 1_281_167, 50_000, 50_000),
    "Caltech101": (100, 4_128, 1_649, 2_465),
    "OxfordPets": (37, 2_944, 736, 3_669),
    "StanfordCars": (196, 6_509, 1_635, 8_041),
    "OxfordFlowers": (102, 4_093, 1_633, 2_463),
    "Food101": (101, 50_500, 20_200, 30_300),
    "FGVCAircraft": (100, 3_334, 3_333, 3_333),
    "SUN397": (397, 15_880, 3_970, 19_850),
    "DescribableTextures": (47, 2_820, 1_128, 1_692),
    "EuroSAT": (10, 13_500, 5_400, 8_100),
    "UCF101": (101, 7_639, 1_898, 3_783),
    "ImageNetV2": (1000, 0, 0, 10_000),
    "ImageNetSketch": (1000, 0, 0, 50_889),
    "ImageNetA": (200, 0, 0, 7_500),
    "ImageNetR": (200, 0, 0, 30_000),
}
IMAGE_CHECKS = ("all", "sample", "none")


@dataclass
class Report:
    """What ``check_dataset`` found: ``status`` is ``ok``, ``warning`` or ``unusable``."""

    name: str
    status: str = "ok"
    lines: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.status = "unusable"
        self.lines.append(f"ERROR: {text}")

    def warn(self, text: str) -> None:
        if self.status == "ok":
            self.status = "warning"
        self.lines.append(f"warning: {text}")

    def info(self, text: str) -> None:
        self.lines.append(text)


def _decode_error(path: str) -> str:
    try:
        with Image.open(path) as img:
            img.load()
        return ""
    except Exception as err:  # any decoding failure makes the image unusable, whatever PIL raises
        return f"{type(err).__name__}: {err}"


def _images_to_check(items: Iterable[Datum], mode: str) -> list[str]:
    paths = list(dict.fromkeys(d.impath for d in items))
    if mode == "sample":  # a few per class are enough to catch a wrong or truncated extraction
        seen: Counter[str] = Counter()
        out = []
        for p in paths:
            folder = os.path.dirname(p)
            if seen[folder] < 3:
                seen[folder] += 1
                out.append(p)
        return out
    return paths if mode == "all" else []


def check_dataset(root: str, name: str, images: str = "all") -> Report:
    """Check one dataset under ``root``; never raises for bad data (it is reported)."""
    cls = DATASETS.get(name)
    report = Report(cls.__name__)
    ds: CoOpDataset = cls.at(root)
    if not os.path.isdir(ds.dataset_path):
        report.problem(f"{ds.dataset_path} not found. Expected under the root: {ds.expected_layout()} "
                       "(download and layout: DATASETS.md)")
        return report
    source = ds.split_source()
    try:
        train, val, test = ds.load_split(save=False)
    except FileNotFoundError as err:
        report.problem(str(err).replace("\n", " "))
        return report
    except splits.SplitFileError as err:  # names the file and what to do
        report.problem(str(err))
        return report
    except Exception as err:  # a malformed split or annotation file
        report.problem(f"cannot read the split of {ds.dataset_path}: {type(err).__name__}: {err}")
        return report
    if source or not ds.split_file:
        report.info(f"split: {source or 'built from the official annotation files'}")
    else:
        report.warn(f"{ds.split_path} is missing: a split rebuilt from the raw files differs from CoOp's, so results "
                    "are not comparable with published ones; put CoOp's split file there (DATASETS.md)")
    if cls.test_only:
        train, val = [], []
    labels = Counter(d.label for d in (test if cls.test_only else train + val + test))
    names = {d.label: d.classname for d in train + val + test}
    counts = (len(names), len(train), len(val), len(test))
    published = PUBLISHED.get(cls.__name__)
    shown = f"{counts[0]} class(es) with images, train {counts[1]:,} / val {counts[2]:,} / test {counts[3]:,}"
    if published:
        shown += f" (published: {published[0]} classes, {published[1]:,} / {published[2]:,} / {published[3]:,})"
    report.info(shown)
    if published and counts != published:
        report.warn("the counts differ from the published ones: another split version or an incomplete copy")
    expected = range(max(names) + 1) if names else range(0)
    empty = [c for c in expected if labels[c] == 0]
    if empty or not names:
        folders = splits.list_dirs(ds.image_path) if os.path.isdir(ds.image_path) else []
        which = ", ".join(repr(names[c]) if c in names else f"folder {folders[c]!r}" if c < len(folders) else
                          f"label {c}" for c in empty[:5]) or "any class"
        report.problem(f"no images for {which} ({len(empty) or 'all'} class(es)): restore those class folders under "
                       f"{ds.image_path}")
    # an empty train was not read (the checker skips ImageNet's large train listing); it is no missing class
    no_train = [(c, n) for c, n in splits.classes_missing_from(train, val, test) if n] if train else []
    if no_train:
        shown = ", ".join(f"label {c} {n!r}" for c, n in no_train[:5])
        report.problem(f"{len(no_train)} class(es) have images in val/test but none in train ({shown}) in "
                       f"{source or ds.split_path}: training stops on them; replace the split file with CoOp's "
                       "original (DATASETS.md), or set DATASET.ALLOW_MISSING_CLASSES True to drop them as Dassl does")
    items = test if cls.test_only else train + val + test
    missing = [p for p in dict.fromkeys(d.impath for d in items) if not os.path.isfile(p)]
    if missing:
        report.problem(f"{len(missing):,} of {len(items):,} listed images are missing, e.g. {missing[0]}: re-extract "
                       f"{ds.image_path} from the original archive (the split paths are relative to it)")
    broken = [(p, e) for p in _images_to_check(items, images) if os.path.isfile(p) for e in [_decode_error(p)] if e]
    if broken:
        path, err = broken[0]
        report.problem(f"{len(broken)} image(s) cannot be decoded, e.g. {path} ({err}): replace them from the "
                       "original archive")
    return report


def check(root: str, names: list[str] | None = None, images: str = "all") -> list[Report]:
    """Reports for ``names`` (default: the 15 benchmark datasets)."""
    if images not in IMAGE_CHECKS:
        raise ValueError(f"images={images!r}: choose from {', '.join(IMAGE_CHECKS)}")
    return [check_dataset(root, DATASETS.canonical(n), images) for n in (names or list(PUBLISHED))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vltune.data check", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the data root (DATASET.ROOT), holding one folder per dataset")
    p.add_argument("--dataset", nargs="+", help="DATASET.NAME values to check (default: the 15 benchmark datasets)")
    p.add_argument("--images", choices=IMAGE_CHECKS, default="all",
                   help="decode every listed image (all), 3 per folder (sample) or none; existence is always checked")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"error: --root {args.root} is not a folder", file=sys.stderr)
        return 2
    reports = check(args.root, args.dataset, args.images)
    for r in reports:
        print(f"{r.name:<20} {r.status.upper()}")
        for line in r.lines:
            print(f"    {line}")
    bad = [r.name for r in reports if r.status == "unusable"]
    print(f"\n{len(reports) - len(bad)} of {len(reports)} usable" + (f"; unusable: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0
