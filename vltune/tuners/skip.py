"""Skip Tuning's parts, shared by the ``SkipTuning`` trainer and the Skip plugin of prompt/adapter trainers.

Wu et al., *Skip Tuning: Pre-trained Vision-Language Models are Effective and Efficient Adapters*, CVPR 2025
(https://arxiv.org/abs/2412.11509); methods.md §13.

* **CSkip** (``ClassSelector``): per batch, keep only some classes for the text side. Classes are ranked by the
  best similarity of the batch's image embeddings to fixed zero-shot prototypes (the batch's labels first); the top
  ``k_top = min(ceil(TOP_RATIO · C), MAX_TOP)`` rank positions are kept and tail position j of n is kept with
  probability ``r_j = (exp(−x_j/λ) − exp(−5/λ)) / (1 − exp(−5/λ))``, ``x_j = 5j/(n − 1)``. Unlike the reference,
  every label of the batch is always kept (never silently mapped to class 0), and the keep-mask can be resampled
  per run (the reference), per epoch or per batch (``MASK_POLICY``).
* **Batches over cached features** (``FeatureLoader``, ``class_batches``): single-class batches when every class has
  at least a batch of samples (the reference's ``batch_random``), else random batches.
* **Feature caches** (``cache_features``, ``cache_placement``): run a frozen function over a dataset once, keep the
  result by dataset index, on the training device when it fits the memory budget, else on the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

logger = logging.getLogger(__name__)

MASK_POLICIES = ("per_run", "per_epoch", "per_batch")
SAMPLER_MODES = ("auto", "single_class", "random")
CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CACHE_DEVICES = ("auto", "cpu", "device")


def add_skip_config(cfg: CN) -> None:
    """``TRAINER.SKIP`` (the SkipTuning method; CSkip's settings also serve the plugin) and ``TRAINER.SKIP_PLUGIN``."""
    cfg.TRAINER.SKIP = CN()
    cfg.TRAINER.SKIP.START_LAYER = 6  # ω: blocks 0..ω-1 of both towers are frozen, cached and never run in a step
    cfg.TRAINER.SKIP.TOP_RATIO = 0.5  # CSkip head: ceil(TOP_RATIO · C) classes (> 1: a count); 1.0 keeps all
    cfg.TRAINER.SKIP.MAX_TOP = 50  # cap of the head
    cfg.TRAINER.SKIP.LAMBDA = 0.3  # λ of the tail's exponential keep probability
    cfg.TRAINER.SKIP.MASK_POLICY = "per_run"  # per_run (reference) | per_epoch | per_batch
    cfg.TRAINER.SKIP.DROP_RATIO = 0.0  # fraction of patch tokens dropped per training step (the CLS token never)
    cfg.TRAINER.SKIP.QUICK_BATCH_SIZE = 128  # images per batch when building the feature cache
    cfg.TRAINER.SKIP.SAMPLER = "auto"  # auto: single_class when NUM_SHOTS >= batch size | single_class | random
    cfg.TRAINER.SKIP.CACHE_DTYPE = "fp16"  # fp16 | bf16 | fp32: storage of cached mid-layer tokens
    cfg.TRAINER.SKIP.CACHE_DEVICE = "auto"  # auto: the training device if within CACHE_BUDGET_MB | cpu | device
    cfg.TRAINER.SKIP.CACHE_BUDGET_MB = 4096  # largest cache kept on a GPU under CACHE_DEVICE auto
    cfg.TRAINER.SKIP.OFFLOAD_FROZEN = True  # move the frozen prefix to the CPU while steps use cached features
    cfg.TRAINER.SKIP_PLUGIN = CN()
    cfg.TRAINER.SKIP_PLUGIN.CSKIP = False  # CSkip (TRAINER.SKIP's TOP_RATIO/MAX_TOP/LAMBDA/MASK_POLICY) in training
    cfg.TRAINER.SKIP_PLUGIN.CACHE_IMAGE = False  # cache the frozen image features once (deterministic transforms)


def check_skip_config(cfg: CN) -> None:
    """Validate ``TRAINER.SKIP`` values that do not depend on the model."""
    c = cfg.TRAINER.SKIP
    if c.TOP_RATIO <= 0:
        raise ValueError(f"TRAINER.SKIP.TOP_RATIO must be > 0 (a fraction <= 1 or a class count), got {c.TOP_RATIO}")
    if c.MAX_TOP < 1:
        raise ValueError(f"TRAINER.SKIP.MAX_TOP must be >= 1, got {c.MAX_TOP}")
    if c.LAMBDA <= 0:
        raise ValueError(f"TRAINER.SKIP.LAMBDA must be > 0, got {c.LAMBDA}")
    if not 0.0 <= c.DROP_RATIO < 1.0:
        raise ValueError(f"TRAINER.SKIP.DROP_RATIO must be in [0, 1), got {c.DROP_RATIO}")
    if c.QUICK_BATCH_SIZE < 1:
        raise ValueError(f"TRAINER.SKIP.QUICK_BATCH_SIZE must be >= 1, got {c.QUICK_BATCH_SIZE}")
    for key, value, valid in (("MASK_POLICY", c.MASK_POLICY, MASK_POLICIES), ("SAMPLER", c.SAMPLER, SAMPLER_MODES),
                              ("CACHE_DTYPE", c.CACHE_DTYPE, tuple(CACHE_DTYPES)),
                              ("CACHE_DEVICE", c.CACHE_DEVICE, CACHE_DEVICES)):
        if value not in valid:
            raise ValueError(f"TRAINER.SKIP.{key} {value!r}: choose from {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------------- CSkip
def head_size(n_classes: int, top_ratio: float, max_top: int) -> int:
    """k_top, the number of always-kept rank positions; ``n_classes`` when every class is kept."""
    if top_ratio == 1.0:
        return n_classes
    k = math.ceil(top_ratio * n_classes) if top_ratio <= 1.0 else math.ceil(min(top_ratio, n_classes))
    return min(k, max_top, n_classes)


def tail_keep_probability(n_tail: int, lam: float) -> torch.Tensor:
    """r_j for tail positions j = 0..n−1: 1 at the head's edge decaying to 0 at the end (methods.md §13.4).

    With one tail position the reference computes 0/0 and drops it; this returns 0 there, the same outcome.
    """
    if n_tail <= 1:
        return torch.zeros(n_tail, dtype=torch.float64)
    x = 5.0 * torch.arange(n_tail, dtype=torch.float64) / (n_tail - 1)
    floor = math.exp(-5.0 / lam)
    return ((torch.exp(-x / lam) - floor) / (1.0 - floor)).clamp(0.0, 1.0)


def expected_kept(n_classes: int, top_ratio: float, max_top: int, lam: float) -> float:
    """E[K'] before labels are force-kept: k_top + Σ r_j."""
    k = head_size(n_classes, top_ratio, max_top)
    return float(k + tail_keep_probability(n_classes - k, lam).sum())


class ClassSelector:
    """CSkip: which classes a training batch's text side computes.

    Args:
        prototypes: fixed normalised zero-shot class features (C, E) of the training classes.
        top_ratio, max_top, lam: ``TRAINER.SKIP`` TOP_RATIO, MAX_TOP, LAMBDA.
        policy: when the keep-mask over rank positions is drawn: once (``per_run``), at ``new_epoch`` or per batch.
        seed: seed of the selector's own generator (< 0: random); the mask never draws from the global RNG.
    """

    def __init__(self, prototypes: torch.Tensor, top_ratio: float, max_top: int, lam: float, policy: str = "per_run",
                 seed: int = -1) -> None:
        if policy not in MASK_POLICIES:
            raise ValueError(f"CSkip mask policy {policy!r}: choose from {', '.join(MASK_POLICIES)}")
        self.prototypes = F.normalize(prototypes.detach().float(), dim=-1)
        self.n_classes = prototypes.shape[0]
        self.k_top = head_size(self.n_classes, top_ratio, max_top)
        self.tail_p = tail_keep_probability(self.n_classes - self.k_top, lam)
        self.policy, self.seed = policy, seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed >= 0 else torch.seed())
        self._mask: torch.Tensor | None = None

    @property
    def keeps_all(self) -> bool:
        return self.k_top == self.n_classes

    def new_epoch(self, epoch: int) -> None:
        """Per-epoch masks are drawn from (seed, epoch), so a resumed run draws what an uninterrupted one did."""
        if self.policy == "per_epoch":
            if self.seed >= 0:
                self.generator.manual_seed(self.seed * 1_000_003 + epoch)
            self._mask = None

    def sample_mask(self) -> torch.Tensor:
        """A fresh keep-mask over the C rank positions (bool)."""
        tail = torch.rand(len(self.tail_p), generator=self.generator, dtype=torch.float64) < self.tail_p
        return torch.cat([torch.ones(self.k_top, dtype=torch.bool), tail])

    def mask(self) -> torch.Tensor:
        if self._mask is None or self.policy == "per_batch":
            self._mask = self.sample_mask()
            if self.policy != "per_batch":
                tail = (self._mask[self.k_top:].nonzero().flatten() + self.k_top).tolist()
                logger.info(f"CSkip keep-mask ({self.policy}): {int(self._mask.sum())} of {self.n_classes} rank "
                            f"positions: head 0..{self.k_top - 1}, tail {tail}")
        return self._mask

    @torch.no_grad()
    def select(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept classes (K',) ascending and the labels remapped into them (B,), both on ``labels.device``.

        Args:
            image: the batch's current image embeddings (B, E) (detached here).
            labels: (B,) class indices in [0, C).
        """
        device = labels.device
        if self.keeps_all:
            return torch.arange(self.n_classes, device=device), labels
        protos = self.prototypes.to(image.device)
        scores = F.normalize(image.detach().float(), dim=-1) @ protos.t()  # (B, C)
        scores[torch.arange(len(labels), device=scores.device), labels.to(scores.device)] = float("inf")
        order = scores.max(dim=0).values.argsort(descending=True).cpu()
        kept = torch.cat([order[self.mask()], labels.cpu()]).unique()  # sorted; labels can never be dropped
        remapped = torch.searchsorted(kept, labels.cpu())
        assert torch.equal(kept[remapped], labels.cpu()), "CSkip lost a ground-truth class"
        return kept.to(device), remapped.to(device)


# ---------------------------------------------------------------------------------------------------- batches
def resolve_sampler(mode: str, num_shots: int, batch_size: int, labels: list[int]) -> str:
    """``single_class`` or ``random`` for ``TRAINER.SKIP.SAMPLER`` ``mode``.

    ``auto`` picks single-class batches when NUM_SHOTS >= the batch size (the reference: shots >= 4 at bs 4). A
    class with fewer samples than a batch makes single-class batching impossible for it (the reference raises):
    fall back to random batches with a warning.
    """
    if mode not in SAMPLER_MODES:
        raise ValueError(f"TRAINER.SKIP.SAMPLER {mode!r}: choose from {', '.join(SAMPLER_MODES)}")
    if mode == "auto":
        mode = "single_class" if num_shots >= batch_size else "random"
    if mode == "single_class":
        counts = torch.bincount(torch.tensor(labels))
        small = [c for c, n in enumerate(counts.tolist()) if n < batch_size]
        if small:
            logger.warning(f"single-class batches need >= {batch_size} samples per class; classes {small[:10]} have "
                           "fewer: using random batches")
            return "random"
    return mode


def class_batches(labels: list[int], batch_size: int, mode: str, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches (dataset indices).

    ``single_class``: repeatedly pick a uniformly random class that still has a full batch of unused samples and
    draw a batch from it without replacement (leftovers below a batch are unused this epoch). ``random``: shuffle,
    cut into batches, drop the remainder (unless there is less than one batch, which is then the only batch).
    """
    n = len(labels)
    if mode == "random":
        perm = torch.randperm(n, generator=generator).tolist()
        if n < batch_size:
            return [perm]
        return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    if mode != "single_class":
        raise ValueError(f"unknown batch mode {mode!r}")
    per_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        per_class.setdefault(y, []).append(i)
    pools = {c: [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
             for c, idx in per_class.items()}
    eligible = [c for c, idx in pools.items() if len(idx) >= batch_size]
    batches = []
    while eligible:
        k = int(torch.randint(len(eligible), (1,), generator=generator))
        c = eligible[k]
        batches.append(pools[c][:batch_size])
        pools[c] = pools[c][batch_size:]
        if len(pools[c]) < batch_size:
            eligible[k] = eligible[-1]
            eligible.pop()
    return batches


class FeatureLoader:
    """Batches over cached per-image features, in the engine's batch format.

    Yields ``{"img": features[idx], "label": labels[idx], "index": idx, "cached": True}``; ``generator`` is reseeded
    by the engine every epoch (like a DataLoader's), so batch order replays on resume.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, mode: str,
                 seed: int = -1) -> None:
        self.features, self.labels, self.batch_size, self.mode = features, labels, batch_size, mode
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed >= 0 else torch.seed())
        self._label_list = labels.tolist()

    def _batches(self, generator: torch.Generator) -> list[list[int]]:
        return class_batches(self._label_list, self.batch_size, self.mode, generator)

    def __len__(self) -> int:
        if self.mode == "random":
            n = len(self._label_list)
            return max(n // self.batch_size, 1)
        counts = torch.bincount(self.labels.cpu())
        return int((counts // self.batch_size).sum())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for idx in self._batches(self.generator):
            index = torch.tensor(idx)
            at = index.to(self.features.device)
            yield {"img": self.features[at], "label": self.labels[index], "index": index, "cached": True}


# ---------------------------------------------------------------------------------------------------- caches
def cache_placement(cfg: CN, nbytes: int, device: torch.device) -> torch.device:
    """Where a cache of ``nbytes`` lives: ``TRAINER.SKIP.CACHE_DEVICE`` (auto: the training device when it is a GPU
    and the cache fits ``CACHE_BUDGET_MB``, else the CPU)."""
    c = cfg.TRAINER.SKIP
    if device.type == "cpu" or c.CACHE_DEVICE == "cpu":
        return torch.device("cpu")
    if c.CACHE_DEVICE == "device" or nbytes <= c.CACHE_BUDGET_MB * 2**20:
        return device
    return torch.device("cpu")


def training_labels(dm: Any) -> torch.Tensor:
    """The labels of the training split, by dataset index (the order of the feature caches)."""
    return torch.tensor([d.label for d in dm.dataset.train_x], dtype=torch.long)


@torch.no_grad()
def cache_features(cfg: CN, dm: Any, fn: Callable[[torch.Tensor], torch.Tensor], *, dtype: torch.dtype | None,
                   device: torch.device, seed: int = -1, reuse: torch.Tensor | None = None) -> torch.Tensor:
    """``fn(images)`` for every training image of ``dm`` (its train transform, one view each), stored by dataset
    index in ``dtype`` (None: as computed).

    The images go through a sequential loader in batches of ``TRAINER.SKIP.QUICK_BATCH_SIZE`` (its augmentation
    seeded by ``seed`` when >= 0). The storage is allocated after the first batch (its shape is known then) on
    ``cache_placement``; on a CUDA run a CPU cache is pinned so the per-step copies overlap with compute. ``reuse``:
    last epoch's cache, overwritten in place when its shape and dtype fit (no second multi-GB allocation per epoch).
    """
    from vltune.data.loader import build_data_loader

    train_x = dm.dataset.train_x
    loader = build_data_loader(cfg, train_x, dm.tfm_train, sampler="SequentialSampler",
                               batch_size=int(cfg.TRAINER.SKIP.QUICK_BATCH_SIZE), is_train=False)
    if seed >= 0:
        loader.generator.manual_seed(seed)
    n_items = len(train_x)
    out: torch.Tensor | None = None
    seen = torch.zeros(n_items, dtype=torch.bool)
    for batch in loader:
        feats = fn(batch["img"].to(device, non_blocking=True))
        index = batch["index"]
        if out is None:
            dtype = dtype or feats.dtype
            if reuse is not None and reuse.shape[1:] == feats.shape[1:] and len(reuse) == n_items \
                    and reuse.dtype == dtype:
                out = reuse
        if out is None:
            nbytes = n_items * feats[0].numel() * torch.tensor([], dtype=dtype).element_size()
            where = cache_placement(cfg, nbytes, device)
            pin = where.type == "cpu" and device.type == "cuda"
            out = torch.empty((n_items, *feats.shape[1:]), dtype=dtype, device=where, pin_memory=pin)
            logger.info(f"Feature cache: {n_items} x {tuple(feats.shape[1:])} {str(dtype).removeprefix('torch.')} "
                        f"= {nbytes / 2**20:.1f} MB on {where}")
        out[index.to(out.device)] = feats.to(out.device, dtype)
        seen[index] = True
    if out is None or not bool(seen.all()):
        raise RuntimeError(f"the feature cache covers {int(seen.sum())} of {n_items} training items")
    return out
