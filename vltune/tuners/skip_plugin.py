"""The Skip plugin: Skip Tuning's class skipping (CSkip) and frozen-feature caching for prompt and adapter trainers.

Wu et al., *Skip Tuning*, CVPR 2025 (methods.md §13) present Skip Tuning as orthogonal to prompt and adapter methods,
but the reference code has no such plugin; this is vltune's. ``PromptTrainer`` (``vltune/tuners/prompting.py``)
inherits this mixin, which stays inert unless ``TRAINER.SKIP_PLUGIN.CSKIP`` or ``CACHE_IMAGE`` is on; its docstring
states the contract a trainer opts into with ``skip_plugin = True``. The mixin relies on the trainer's
``image_features``, ``image_from_frozen``, ``frozen_image_features``, ``image_is_frozen``, ``class_text_features``,
``make_parts``, ``backbone`` and ``template``.
"""

from __future__ import annotations

from typing import Any

import torch
from yacs.config import CfgNode as CN

from vltune.data.transforms import DETERMINISTIC
from vltune.tuners.skip import ClassSelector, FeatureLoader, cache_features, check_skip_config, training_labels


class SkipPluginMixin:
    """CSkip over the text side and a once-per-run cache of frozen image features, switched on by config."""

    _selector: ClassSelector | None = None  # CSkip, built on first use
    skip_plugin = False  # a trainer class opts in in its own body (never inherited)
    config_reads = ("TRAINER.SKIP_PLUGIN", "TRAINER.SKIP")

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        c = cfg.TRAINER.SKIP_PLUGIN
        if not (c.CSKIP or c.CACHE_IMAGE):
            return
        if not type(self).__dict__.get("skip_plugin", False):
            raise ValueError(f"TRAINER.SKIP_PLUGIN is not supported by {type(self).__name__}: it needs "
                             "forward_parts = image_features + class_text_features + τ·cos (CoOp, KgCoOp, "
                             "CLIPAdapter, OriginCLIPAdapter, FinetuneCLIP); turn CSKIP and CACHE_IMAGE off")
        check_skip_config(cfg)
        moving = [t for t in cfg.INPUT.TRANSFORMS if t not in DETERMINISTIC]
        if c.CACHE_IMAGE and moving:
            raise ValueError(f"TRAINER.SKIP_PLUGIN.CACHE_IMAGE caches one view per image, but INPUT.TRANSFORMS has "
                             f"random {moving}: use deterministic transforms ({', '.join(DETERMINISTIC)}) or set "
                             "CACHE_IMAGE False")

    def _plugin_on(self) -> bool:
        c = self.cfg.TRAINER.SKIP_PLUGIN
        return bool(c.CSKIP or c.CACHE_IMAGE)

    def _skip_parts(self, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Features and logits of a training batch under the plugin, and the batch its loss reads."""
        x = batch["img"]
        image = self.image_from_frozen(x) if batch.get("cached") else self.image_features(x)
        if not self.cfg.TRAINER.SKIP_PLUGIN.CSKIP:
            text = self.class_text_features()
            return self.make_parts(image, text), batch
        if self._selector is None:
            c = self.cfg.TRAINER.SKIP
            protos = self.backbone.zero_shot_classifier(self.classnames, [self.template])
            self._selector = ClassSelector(protos, float(c.TOP_RATIO), int(c.MAX_TOP), float(c.LAMBDA),
                                           c.MASK_POLICY, seed=int(self.cfg.SEED))
        kept, labels = self._selector.select(image, batch["label"])
        text = self.class_text_features(kept)
        return self.make_parts(image, text), {**batch, "label": labels, "classes": kept}

    def before_train(self) -> None:
        super().before_train()
        if not self.cfg.TRAINER.SKIP_PLUGIN.CACHE_IMAGE:
            return
        if not self.image_is_frozen():
            raise ValueError(f"TRAINER.SKIP_PLUGIN.CACHE_IMAGE: {type(self).__name__}'s image path trains here, "
                             "so its features cannot be cached")
        def frozen(images: torch.Tensor) -> torch.Tensor:
            with self.precision.autocast():
                return self.frozen_image_features(images)

        with self.cost.phase("cache"):
            feats = cache_features(self.cfg, self.dm, frozen, dtype=None, device=self.device)
        batch = int(self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE)
        self.train_loader_x = FeatureLoader(feats, training_labels(self.dm), batch, "random", seed=int(self.cfg.SEED))

    def before_epoch(self) -> None:
        super().before_epoch()
        if self._selector is not None:
            self._selector.new_epoch(self.epoch)

    def after_train(self) -> None:
        self.train_loader_x = self.dm.train_loader_x  # drop a feature cache before testing
        super().after_train()
