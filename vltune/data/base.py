"""``DatasetBase`` (Dassl's split container) and ``CoOpDataset``, the family base class of every CoOp-layout dataset.

The read-split / few-shot / cache / subsample sequence that CoOp copy-pastes into ten dataset files lives once here
(pattern: Dassl ``dassl/data/datasets/dg/wilds/wilds_base.py``); a dataset file declares its folders and, when its
split can be rebuilt from raw annotations, a ``build_split``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Sequence

from yacs.config import CfgNode

from vltune.data import cache, splits
from vltune.data.datum import Datum
from vltune.registry import DATASETS

logger = logging.getLogger(__name__)


class MissingClassError(ValueError):
    """A class has no image in the train split of a training run (see ``CoOpDataset.check_train_classes``)."""


class DatasetBase:
    """Train/val/test lists of ``Datum`` and the label maps.

    ``lab2cname``, ``classnames`` and ``num_classes`` come from ``train_x`` (Dassl); when ``train_x`` is empty
    (eval-only builds) they come from ``test``. Test-only datasets pass ``train_x=test``.
    """

    def __init__(
        self,
        train_x: Sequence[Datum] | None = None,
        val: Sequence[Datum] | None = None,
        test: Sequence[Datum] | None = None,
    ) -> None:
        self._train_x, self._val, self._test = list(train_x or []), list(val or []), list(test or [])
        mapping: dict[int, str] = {}
        for d in self._train_x or self._test:
            if mapping.setdefault(d.label, d.classname) != d.classname:
                raise ValueError(f"label {d.label} has two class names: {mapping[d.label]!r} and {d.classname!r}")
        self._lab2cname = dict(sorted(mapping.items()))
        self._num_classes = max(mapping) + 1 if mapping else 0

    @property
    def train_x(self) -> list[Datum]:
        return self._train_x

    @property
    def train_u(self) -> None:
        """Dassl's unlabelled split; CLIP adaptation has none (Dassl's DataManager reads the attribute)."""
        return None

    @property
    def val(self) -> list[Datum]:
        return self._val

    @property
    def test(self) -> list[Datum]:
        return self._test

    @property
    def lab2cname(self) -> dict[int, str]:
        return self._lab2cname

    @property
    def classnames(self) -> list[str]:
        """Class names sorted by label."""
        return list(self._lab2cname.values())

    @property
    def num_classes(self) -> int:
        return self._num_classes


class CoOpDataset(DatasetBase):
    """A dataset in CoOp's folder layout under ``DATASET.ROOT``.

    Subclasses set these class attributes:
        dataset_dir: folder under the root (``oxford_pets``).
        image_dir: image folder under ``dataset_dir`` ("" = ``dataset_dir`` itself); split paths are relative to it.
        split_file: split JSON under ``dataset_dir`` ("" when the split always comes from ``build_split``).
        template: the hand-written prompt, one ``{}`` for the class name (CoOp's ``CUSTOM_TEMPLATES`` entry).
        layout: the expected folder contents, quoted when something is missing.
        test_only: evaluation-only data (ImageNet variants): ``train_x = test``; NUM_SHOTS/SUBSAMPLE ignored.
        variant_of: the registry name of the dataset this one is a domain-shifted test set of (domain
            generalisation; a hand-run evaluation of its trained model is a DG result).
        fewshot_val: draw val too (``min(K, 4)``); False for ImageNet, whose val is its test set.
    and override ``build_split(self) -> (train, val, test)`` when the split can be built from raw files; it is called
    only when the JSON is missing and must draw randomness from ``self.rng``. Instances hold the absolute paths
    ``dataset_path``, ``image_path``, ``split_path``.
    """

    dataset_dir = ""
    image_dir = ""
    split_file = ""
    template = "a photo of a {}."
    layout = ""
    test_only = False
    variant_of = ""  # the dataset this one is a domain-shifted test set of (ImageNetV2: "ImageNet"); tables use it
    fewshot_val = True

    def __init__(self, cfg: CfgNode, *, load_train: bool = True) -> None:
        self._locate(cfg.DATASET.ROOT, int(cfg.SEED))
        self.load_train = load_train
        if not os.path.isdir(self.dataset_path):
            raise self.missing(self.dataset_path)

        train, val, test = self.load_split()
        if self.test_only:
            super().__init__(train_x=test, test=test)
            return
        if load_train:
            self.check_train_classes(train, val, test, allow_missing=bool(cfg.DATASET.get("ALLOW_MISSING_CLASSES")))
            if cfg.DATASET.NUM_SHOTS >= 1:
                train, val = self.fewshot(train, val, test, cfg.DATASET.NUM_SHOTS)
            train, val, test = splits.subsample_classes(train, val, test, subsample=cfg.DATASET.SUBSAMPLE_CLASSES)
        else:  # eval-only: no few-shot draw; the labels of the test split give the same classes and relabelling
            train, val = [], []
            (test,) = splits.subsample_classes(test, subsample=cfg.DATASET.SUBSAMPLE_CLASSES)
        super().__init__(train_x=train, val=val, test=test)

    def _locate(self, root: str, seed: int) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.dataset_path = os.path.join(self.root, self.dataset_dir)
        self.image_path = os.path.join(self.dataset_path, self.image_dir) if self.image_dir else self.dataset_path
        self.split_path = os.path.join(self.dataset_path, self.split_file) if self.split_file else ""
        self.seed = seed
        # Dassl draws from the global random seeded at start-up; a fresh Random(SEED) has the same state.
        self.rng = random.Random(self.seed) if self.seed >= 0 else random.Random()
        self._split_sha256 = ""

    @classmethod
    def at(cls, root: str, seed: int = 1) -> CoOpDataset:
        """An instance that only knows its paths (nothing read): for inspecting a data root without loading it."""
        obj = cls.__new__(cls)
        obj._locate(root, seed)
        obj.load_train = False
        return obj

    # -------------------------------------------------------------- errors
    def expected_layout(self) -> str:
        """``layout``, or one derived from the folder attributes (``digits/  images/, split_zhou_Digits.json``)."""
        if self.layout:
            return self.layout
        return f"{self.dataset_dir}/  " + ", ".join(
            p for p in (self.image_dir and self.image_dir + "/", self.split_file) if p
        )

    def missing(self, path: str) -> FileNotFoundError:
        """The error for a missing file or folder: names it and shows the dataset's expected layout."""
        return FileNotFoundError(
            f"{type(self).__name__}: {path} not found. Expected layout under DATASET.ROOT ({self.root}):\n"
            f"  {self.expected_layout()}\n(the CoOp layout, see CoOp's DATASETS.md)"
        )

    def require(self, *parts: str) -> str:
        """``dataset_path/<parts>``, raising ``missing`` when it does not exist."""
        path = os.path.join(self.dataset_path, *parts)
        if not os.path.exists(path):
            raise self.missing(path)
        return path

    # -------------------------------------------------------------- split
    def build_split(self) -> splits.Split:
        """Build (train, val, test) from raw files; the default has none and reports the missing split file."""
        raise self.missing(self.split_path or self.dataset_path)

    def split_source(self) -> str:
        """Where ``load_split`` reads the split: the JSON in the data root or the cache dir, else "" (raw files)."""
        if not self.split_file:
            return ""
        cached = os.path.join(cache.cache_root(), "splits", self.dataset_dir, self.split_file)
        return next((p for p in (self.split_path, cached) if os.path.isfile(p)), "")

    def load_split(self, save: bool = True) -> splits.Split:
        """Read the split JSON (data root, then the cache dir), else ``build_split`` and (``save``) save the JSON."""
        if not self.split_file:
            return self.build_split()
        path = self.split_source()
        if path:
            with open(path, "rb") as f:
                self._split_sha256 = hashlib.sha256(f.read()).hexdigest()
            return splits.read_split(path, self.image_path)
        train, val, test = self.build_split()
        if not save:
            return train, val, test
        path = os.path.join(cache.writable_dir(self.dataset_path, "", "splits"), self.split_file)
        self._split_sha256 = hashlib.sha256(splits.save_split(train, val, test, path, self.image_path)).hexdigest()
        return train, val, test

    def check_train_classes(
        self, train: list[Datum], val: list[Datum], test: list[Datum], *, allow_missing: bool = False
    ) -> None:
        """Raise ``MissingClassError`` when a class has no train image (``allow_missing``: only log a warning).

        Dassl derives the classes from train alone, so such a class silently vanishes: the class count drops and
        the base/new cut moves by one class, and nothing fails. Checked on the full train split, before the
        few-shot draw (which never drops a class), so a training run stops before it starts.
        """
        missing = splits.classes_missing_from(train, val, test)
        if not missing:
            return
        source = self.split_source() or f"the split built from the raw files under {self.dataset_path}"
        shown = ", ".join(f"label {c} {n!r}" if n else f"label {c} (in no split)" for c, n in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        text = f"{type(self).__name__}: {len(missing)} class(es) have no train image in {source}: {shown}{more}"
        if allow_missing:
            logger.warning(f"{text}; DATASET.ALLOW_MISSING_CLASSES is True, so they are dropped as Dassl does")
            return
        raise MissingClassError(
            f"{text}. Dassl would silently drop them (fewer classes, a shifted base/new cut). Replace the split file "
            f"with CoOp's original (CoOp's DATASETS.md), or set DATASET.ALLOW_MISSING_CLASSES True to train without "
            f"them as Dassl does; check the whole root with: python -m vltune.data check --root {self.root} "
            f"--dataset {type(self).__name__}"
        )

    def fewshot(
        self, train: list[Datum], val: list[Datum], test: list[Datum], num_shots: int
    ) -> tuple[list[Datum], list[Datum]]:
        """K-shot train and ``min(K, 4)``-shot val, from the cache when present (keyed by K, SEED and the split)."""
        if self.seed < 0:  # an unseeded draw is not reproducible, so it is not cached either
            logger.info(f"Creating a {num_shots}-shot dataset")
            return self._draw(train, val, num_shots)
        sha = self._split_sha256 or hashlib.sha256(splits.dump_split(train, val, test, self.image_path)).hexdigest()
        args = (self.dataset_path, self.image_path, num_shots, self.seed, sha)
        cached = cache.load_fewshot_cache(*args, known=train + val)
        if cached is not None:
            return cached["train"], cached.get("val", val)
        logger.info(f"Creating a {num_shots}-shot dataset")
        train, val = self._draw(train, val, num_shots)
        cache.save_fewshot_cache(*args, {"train": train, "val": val} if self.fewshot_val else {"train": train})
        return train, val

    def _draw(self, train: list[Datum], val: list[Datum], num_shots: int) -> tuple[list[Datum], list[Datum]]:
        train = splits.generate_fewshot(train, num_shots, self.rng)
        if self.fewshot_val:
            val = splits.generate_fewshot(val, min(num_shots, 4), self.rng)
        return train, val


def build_dataset(cfg: CfgNode, load_train: bool = True) -> DatasetBase:
    """The dataset registered as ``cfg.DATASET.NAME``; ``load_train=False`` for eval-only runs."""
    name = cfg.DATASET.NAME
    logger.info(f"Loading dataset: {name}")
    return DATASETS.get(name)(cfg, load_train=load_train)
