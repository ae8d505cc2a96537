"""``DataManager``: dataset → transforms → loaders, with Dassl's batch dict and reproducible shuffling/augmentation.

Batches are ``{"img": (B, 3, H, W) float, "label": (B,) long, "index": (B,) long, "impath": list[str],
"domain": (B,) long}``; with ``DATALOADER.K_TRANSFORMS > 1`` (train) ``img`` is a list of K such tensors, and
``DATALOADER.RETURN_IMG0`` adds the un-augmented ``img0``. Unlike Dassl, a seeded run passes a seeded generator and
a per-worker seed function, so order and augmentation repeat exactly; test-only datasets get no train loader.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from yacs.config import CfgNode

from vltune.data.base import DatasetBase, build_dataset
from vltune.data.datum import Datum
from vltune.data.transforms import DETERMINISTIC, INTERPOLATION, build_transform

logger = logging.getLogger(__name__)
SAMPLERS = ("RandomSampler", "SequentialSampler")


class ImageReadError(OSError):
    """An image of a split cannot be opened or decoded; the message names the file and the checker command.

    One positional message argument only: a DataLoader worker re-raises the error in the main process as
    ``type(err)(message)``.
    """


def check_command(cfg: CfgNode | None = None) -> str:
    """The dataset checker command line for ``cfg``'s root and dataset (a placeholder root without ``cfg``)."""
    if cfg is None or not cfg.DATASET.ROOT:
        return "python -m vltune.data check --root DATA"
    name = f" --dataset {cfg.DATASET.NAME}" if cfg.DATASET.NAME else ""
    return f"python -m vltune.data check --root {cfg.DATASET.ROOT}{name}"


def open_image(path: str, checker: str = "python -m vltune.data check --root DATA") -> Image.Image:
    """``path`` decoded as RGB; any failure becomes an ``ImageReadError`` naming the file and ``checker``.

    PIL's own errors ("image file is truncated") do not name the file, and on a real dataset the first bad image
    may come hours into a run; the checker lists every unreadable image of the dataset in one pass.
    """
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except Exception as err:  # whatever PIL raises (OSError, SyntaxError, DecompressionBombError, ...)
        raise ImageReadError(
            f"cannot read image {path}: {type(err).__name__}: {err}. Replace it from the original archive; to find "
            f"every unreadable image of the dataset at once, run: {checker}"
        ) from err


SAMPLE_CACHE_BYTES = 256 * 2**20  # the most a training set keeps of its transformed images (see DatasetWrapper)


class DatasetWrapper(Dataset):
    """Opens images with PIL (RGB, ``open_image``) and applies the transform ``k_transforms`` times.

    ``cache_bytes > 0`` keeps each item's output after its first read, up to that many bytes of image tensors, and
    serves later epochs from memory. Only for outputs that cannot change between reads: ``DataManager`` asks for it
    for training sets whose transforms are all deterministic, and only a main-process loader keeps it. Decoding and
    resizing small images otherwise costs as much as a few-shot training step itself.
    """

    def __init__(
        self,
        data: Sequence[Datum],
        transform: Callable,
        k_transforms: int = 1,
        img0_transform: Callable | None = None,
        checker: str = "python -m vltune.data check --root DATA",
        cache_bytes: int = 0,
    ) -> None:
        self.data, self.transform, self.k, self.img0_transform = list(data), transform, k_transforms, img0_transform
        self.checker = checker
        self.cache_bytes, self._cached_bytes, self._cache = cache_bytes, 0, {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        if index in self._cache:
            return dict(self._cache[index])
        item = self.data[index]
        img = open_image(item.impath, self.checker)
        out = {"label": item.label, "domain": item.domain, "impath": item.impath, "index": index}
        out["img"] = [self.transform(img) for _ in range(self.k)] if self.k > 1 else self.transform(img)
        if self.img0_transform is not None:
            out["img0"] = self.img0_transform(img)
        if self.cache_bytes:
            size = sum(v.nbytes for v in out.values() if isinstance(v, torch.Tensor))
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[index], self._cached_bytes = dict(out), self._cached_bytes + size
        return out


def seed_worker(worker_id: int) -> None:
    """Seed python/numpy/torch in a loader worker from its torch seed (derived from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_data_loader(
    cfg: CfgNode,
    data: Sequence[Datum],
    transform: Callable,
    *,
    sampler: str,
    batch_size: int,
    is_train: bool,
    k_transforms: int = 1,
    img0_transform: Callable | None = None,
    cache_bytes: int = 0,
) -> DataLoader:
    """A DataLoader over ``data``; ``drop_last`` only for training sets at least one batch long (Dassl).

    ``cache_bytes``: keep transformed items in memory up to that size (``DatasetWrapper``), only with
    ``NUM_WORKERS`` 0 and only for a ``transform`` that gives the same output on every read.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; vltune supports {', '.join(SAMPLERS)}")
    if not data:
        raise ValueError("cannot build a data loader over an empty split")
    workers = cfg.DATALOADER.NUM_WORKERS
    seeded = cfg.SEED >= 0
    loader = DataLoader(
        DatasetWrapper(data, transform, k_transforms, img0_transform, check_command(cfg),
                       cache_bytes if workers == 0 else 0),  # a worker's copy would be lost when it exits
        batch_size=batch_size,
        shuffle=sampler == "RandomSampler",
        num_workers=workers,
        drop_last=is_train and len(data) >= batch_size,
        pin_memory=bool(cfg.USE_CUDA) and torch.cuda.is_available(),
        # Seeded runs start fresh workers each epoch: their seeds then come from the generator, which the engine
        # reseeds per epoch, so a resumed run replays the same augmentations as an uninterrupted one.
        persistent_workers=workers > 0 and not seeded,
        generator=torch.Generator().manual_seed(cfg.SEED) if seeded else None,
        worker_init_fn=seed_worker if seeded else None,
    )
    if len(loader) == 0:
        raise ValueError(f"the data loader is empty ({len(data)} items, batch size {batch_size})")
    return loader


class DataManager:
    """Builds the dataset (unless given), the transforms and the train/val/test loaders.

    ``train_loader_x`` is None for eval-only builds (``load_train=False``) and for test-only datasets;
    ``val_loader`` is None when there is no val split.
    """

    def __init__(
        self,
        cfg: CfgNode,
        *,
        load_train: bool = True,
        dataset: DatasetBase | None = None,
        tfm_train: Callable | None = None,
        tfm_test: Callable | None = None,
    ) -> None:
        self.dataset = dataset if dataset is not None else build_dataset(cfg, load_train=load_train)
        # Training items are read once per epoch; when the train transform is cfg's and draws no randomness, they
        # are kept after the first read (the test transform is always deterministic, but read once).
        fixed = (tfm_train is None and cfg.DATALOADER.K_TRANSFORMS == 1
                 and all(name in DETERMINISTIC for name in cfg.INPUT.TRANSFORMS))
        self.tfm_train = tfm_train or build_transform(cfg, is_train=True)
        self.tfm_test = tfm_test or build_transform(cfg, is_train=False)
        dl = cfg.DATALOADER
        img0 = None
        if dl.RETURN_IMG0:
            norm = (
                [T.Normalize(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)] if "normalize" in cfg.INPUT.TRANSFORMS else []
            )
            resize = T.Resize(list(cfg.INPUT.SIZE), interpolation=INTERPOLATION[cfg.INPUT.INTERPOLATION])
            img0 = T.Compose([resize, T.ToTensor(), *norm])
        ds = self.dataset
        self.train_loader_x = None
        if load_train and not getattr(ds, "test_only", False):
            self.train_loader_x = build_data_loader(
                cfg,
                ds.train_x,
                self.tfm_train,
                sampler=dl.TRAIN_X.SAMPLER,
                batch_size=dl.TRAIN_X.BATCH_SIZE,
                is_train=True,
                k_transforms=dl.K_TRANSFORMS,
                img0_transform=img0,
                cache_bytes=SAMPLE_CACHE_BYTES if fixed else 0,
            )
        test_kw = {
            "sampler": dl.TEST.SAMPLER,
            "batch_size": dl.TEST.BATCH_SIZE,
            "is_train": False,
            "img0_transform": img0,
        }
        self.val_loader = build_data_loader(cfg, ds.val, self.tfm_test, **test_kw) if ds.val else None
        self.test_loader = build_data_loader(cfg, ds.test, self.tfm_test, **test_kw)
        self.num_classes = ds.num_classes
        self.lab2cname = ds.lab2cname
        self.classnames = ds.classnames
        self.num_source_domains = 1
        self.show_dataset_summary(cfg)

    def show_dataset_summary(self, cfg: CfgNode) -> None:
        """Log Dassl's summary table (tabulate "simple" format, no header)."""
        ds = self.dataset
        rows = [
            ("Dataset", cfg.DATASET.NAME),
            ("# classes", f"{self.num_classes:,}"),
            ("# train_x", f"{len(ds.train_x):,}"),
            ("# val", f"{len(ds.val):,}"),
            ("# test", f"{len(ds.test):,}"),
        ]
        w0, w1 = max(len(a) for a, _ in rows), max(len(b) for _, b in rows)
        rule = f"{'-' * w0}  {'-' * w1}"
        logger.info("\n".join([rule, *(f"{a:<{w0}}  {b:<{w1}}".rstrip() for a, b in rows), rule]))
