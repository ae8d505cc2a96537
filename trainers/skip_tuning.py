"""Skip Tuning: Wu, Zhang, Zeng, Gao, Song, Shen, *Skip Tuning: Pre-trained Vision-Language Models are Effective and
Efficient Adapters*, CVPR 2025 (https://arxiv.org/abs/2412.11509). Reference: Koorye/SkipTuning
``trainers/skip_tuning.py`` and ``trainers/feature_loader.py`` (no license; re-implemented from methods.md §13).

FT-CLIP made cheap by two skips; the only loss is CE.

* **LSkip**: the embeddings and blocks 0..ω−1 (ω = ``TRAINER.SKIP.START_LAYER``) of both towers are frozen and never
  run in a training step. Their outputs are cached: the text tokens of every class once per run (frozen layers
  cannot change them), the image tokens of every training image once per epoch with that epoch's augmentation,
  in batches of ``QUICK_BATCH_SIZE``, on the GPU or the CPU by ``CACHE_DEVICE``/``CACHE_BUDGET_MB``. Steps run
  blocks ω..end and the heads only; on a GPU the frozen prefix waits on the CPU (``OFFLOAD_FROZEN``) while they do.
* **CSkip**: per batch the text side computes only the classes ``vltune.tuners.skip.ClassSelector`` keeps (ranked
  against the fixed zero-shot prototypes P of the cached text; every label of the batch kept; labels remapped).
* Batches: single-class when NUM_SHOTS >= the batch size (``TRAINER.SKIP.SAMPLER``), else random.
* Staged LR and templates are FT-CLIP's (``TRAINER.FINETUNE.TEXT_LR``/``IMAGE_LR``, §13.7); "fewer epochs for
  ImageNet, SUN397 and Food101" is a ``PER_DATASET`` block of the shipped yaml files, not a name check.
* Inference is a full CLIP forward with the tuned weights, class text features once per evaluation (FT-CLIP's).

Departures from the reference: the text cache is built once and the image cache stops at block ω−1 (the reference
recomputes both every epoch through the whole tower); ground-truth classes are always kept; the keep-mask policy is
configurable; ``DROP_RATIO`` never drops the CLS token; checkpoints hold the trainable tensors only; the shipped
configs use amp rather than pure fp16 SGD without loss scaling.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from trainers.ftclip import FinetuneCLIP, prefix_names
from vltune.registry import TRAINERS
from vltune.tuners.prompting import accuracy
from vltune.tuners.skip import (
    CACHE_DTYPES,
    ClassSelector,
    FeatureLoader,
    add_skip_config,
    cache_features,
    check_skip_config,
    resolve_sampler,
    training_labels,
)

logger = logging.getLogger(__name__)


@TRAINERS.register("SkipTuning", add_config=add_skip_config, family="finetune",
                   test_overrides=dict(trainable_params=108_416, opts={"TRAINER.SKIP.START_LAYER": 1}),
                   presets=dict(b2n="vit_b16_bs4", xd="vit_b16_bs4_cross_datasets", fewshot="vit_b16_bs4_few_shot"))
class SkipTuning(FinetuneCLIP):
    """FT-CLIP with the lower ω blocks cached (LSkip) and a per-batch class subset on the text side (CSkip)."""

    depth_key = "SKIP.START_LAYER"

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        check_skip_config(cfg)
        if cfg.TRAINER.SKIP.START_LAYER < 0:
            raise ValueError(f"TRAINER.SKIP.START_LAYER must be >= 0, got {cfg.TRAINER.SKIP.START_LAYER}")
        if cfg.TRAINER.FINETUNE.START_LAYER:
            raise ValueError("SkipTuning freezes TRAINER.SKIP.START_LAYER blocks; leave TRAINER.FINETUNE.START_LAYER "
                             "at 0")
        if self._prefix(cfg.TRAINER.FINETUNE):
            raise ValueError("SkipTuning caches the embeddings, so they cannot train: leave "
                             "TRAINER.FINETUNE.LEARNABLE_PREFIX_MODULES empty")

    def build_model(self) -> None:
        super().build_model()
        self.omega = self.frozen_depth()
        self.selector: ClassSelector | None = None
        self._text_mid: torch.Tensor | None = None  # (C, L, D_t) output of text block ω−1 (training classes)
        self._text_eot: torch.Tensor | None = None
        self._text_fixed: torch.Tensor | None = None  # all class features when the text tower is frozen
        self._in_training = False
        self.kept_counts: list[int] = []
        train_x = [] if self.eval_only or self.train_loader_x is None else self.dm.dataset.train_x
        self._labels = training_labels(self.dm) if train_x else torch.zeros(0, dtype=torch.long)
        self.sampler_mode = resolve_sampler(self.cfg.TRAINER.SKIP.SAMPLER, int(self.cfg.DATASET.NUM_SHOTS),
                                            int(self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE), self._labels.tolist()
                                            ) if train_x else ""

    # ---- the frozen prefix ------------------------------------------------------------------------------------
    def _prefix_params(self) -> list[torch.nn.Parameter]:
        """The embeddings and blocks 0..ω−1 of both towers (what the caches replace during steps)."""
        params = dict(self.model.named_parameters())
        names = {n for ns in prefix_names(self.model).values() for n in ns}
        blocks = tuple(f"model.{t}transformer.resblocks.{i}." for t in ("", "visual.") for i in range(self.omega))
        names |= {n for n in params if blocks and n.startswith(blocks)}
        return [params[n] for n in sorted(names)]

    def _place_prefix(self, device: torch.device) -> None:
        """Move the frozen prefix (only on a GPU run with ``OFFLOAD_FROZEN``; it is never part of a step)."""
        if self.device.type == "cpu" or not self.cfg.TRAINER.SKIP.OFFLOAD_FROZEN:
            return
        for p in self._prefix_params():
            p.data = p.data.to(device)

    @torch.no_grad()
    def image_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after image block ω−1: (B, 3, H, W) → (B, 1 + P, D_v)."""
        with self.precision.autocast():
            return self.model.image_blocks(self.model.embed_image(images), 0, self.omega)

    @torch.no_grad()
    def build_text_cache(self) -> None:
        """Text tokens after block ω−1 for every training class, and the zero-shot prototypes CSkip ranks by."""
        clip, c = self.model, self.cfg.TRAINER.SKIP
        ids = clip.tokenize([self.ft_template.format(n.replace("_", " ")) for n in self.classnames])
        eot = clip.eot_index(ids)
        ids = clip.cut_text(ids, eot)
        with self.precision.autocast():
            mid = torch.cat([clip.text_blocks(clip.embed_text(chunk), 0, self.omega) for chunk in ids.split(256)])
            protos = F.normalize(clip.text_head(clip.text_blocks(mid, self.omega, clip.n_layers_text), eot), dim=-1)
        self._text_mid, self._text_eot = mid, eot
        self._text_fixed = None if self.learn_text else protos
        self.selector = ClassSelector(protos, float(c.TOP_RATIO), int(c.MAX_TOP), float(c.LAMBDA), c.MASK_POLICY,
                                      seed=int(self.cfg.SEED))
        logger.info(f"LSkip: blocks 0..{self.omega - 1} cached; CSkip head {self.selector.k_top} of "
                    f"{len(self.classnames)} classes, batches {self.sampler_mode}")

    def build_image_cache(self, seed: int) -> FeatureLoader:
        """This epoch's augmented image tokens after block ω−1, and the batches over them."""
        c = self.cfg.TRAINER.SKIP
        previous = self.train_loader_x.features if isinstance(self.train_loader_x, FeatureLoader) else None
        feats = cache_features(self.cfg, self.dm, self.image_prefix, dtype=CACHE_DTYPES[c.CACHE_DTYPE],
                               device=self.device, seed=seed, reuse=previous)
        return FeatureLoader(feats, self._labels, int(self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE), self.sampler_mode,
                             seed=seed)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def before_train(self) -> None:
        super().before_train()
        self._in_training = True
        with self.cost.phase("cache"):
            self.build_text_cache()
            self._place_prefix(torch.device("cpu"))

    def before_epoch(self) -> None:
        super().before_epoch()
        seed = self.cfg.SEED * 100_003 + self.epoch if self.cfg.SEED >= 0 else -1
        with self.cost.phase("cache"):
            self._place_prefix(self.device)
            self.train_loader_x = self.build_image_cache(seed)
            self._place_prefix(torch.device("cpu"))
        if self.selector is not None:
            self.selector.new_epoch(self.epoch)

    def after_train(self) -> None:
        self._in_training = False
        self.train_loader_x = self.dm.train_loader_x  # drop the cache before testing
        self._place_prefix(self.device)
        super().after_train()

    def before_evaluate(self) -> None:
        self._place_prefix(self.device)
        super().before_evaluate()

    def after_evaluate(self) -> None:
        super().after_evaluate()
        if self._in_training:
            self._place_prefix(torch.device("cpu"))

    # ---- a training step --------------------------------------------------------------------------------------
    def _drop_tokens(self, x: torch.Tensor) -> torch.Tensor:
        ratio = float(self.cfg.TRAINER.SKIP.DROP_RATIO)
        if ratio <= 0:
            return x
        n_patch = x.shape[1] - 1
        keep = torch.randperm(n_patch)[: max(1, round((1 - ratio) * n_patch))].sort().values + 1
        return torch.cat([x[:, :1], x[:, keep.to(x.device)]], dim=1)

    def class_text(self, kept: torch.Tensor) -> torch.Tensor:
        """Normalised text features of the kept training classes (K', E), from the cached tokens."""
        if self._text_fixed is not None:
            return self._text_fixed[kept]
        clip, eot = self.model, self._text_eot[kept.to(self._text_eot.device)]
        x = clip.cut_text(self._text_mid[kept.to(self._text_mid.device)], eot)
        return F.normalize(clip.text_head(clip.text_blocks(x, self.omega, clip.n_layers_text), eot), dim=-1)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """CE over the CSkip classes; ``img`` holds cached block-ω−1 tokens (``cached``) or pixels (the frozen prefix
        then runs here without autograd, which gives the same step)."""
        if self.selector is None:
            self.build_text_cache()
        clip, labels = self.model, batch["label"]
        x = batch["img"].to(clip.dtype) if batch.get("cached") else self.image_prefix(batch["img"])
        with torch.set_grad_enabled(self.learn_image and torch.is_grad_enabled()):
            x = clip.image_blocks(self._drop_tokens(x), self.omega, clip.n_layers_image)
            image = F.normalize(clip.image_head(x), dim=-1)
        kept, target = self.selector.select(image, labels)
        self.kept_counts.append(len(kept))
        logits = self.similarity(image, self.class_text(kept))
        self.log_metric("acc", accuracy(logits, target))
        return {"ce": F.cross_entropy(logits, target)}

    def method_record(self) -> dict[str, Any]:
        record = {**super().method_record(), "start_layer": self.omega, "sampler": self.sampler_mode,
                  "mask_policy": self.cfg.TRAINER.SKIP.MASK_POLICY}
        if self.selector is not None:
            record["cskip_head"] = self.selector.k_top
        if self.kept_counts:
            record["mean_kept_classes"] = sum(self.kept_counts) / len(self.kept_counts)
        return record
