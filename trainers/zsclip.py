"""Zero-shot CLIP: Radford et al., *Learning Transferable Visual Models From Natural Language Supervision*, ICML 2021
(https://arxiv.org/abs/2103.00020). Reference: KaiyangZhou/CoOp ``trainers/zsclip.py``.

Trainable: nothing. Run with ``--eval-only`` (no ``--model-dir``); a training run just evaluates.
``ZeroshotCLIP`` uses the dataset's template; ``ZeroshotCLIP2`` averages the 7 ``IMAGENET_TEMPLATES_SELECT`` plus
the dataset template (except on ImageNet), built as a fresh list per instance (upstream appends to a module list).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vltune.clip import IMAGENET_TEMPLATES_SELECT
from vltune.engine import TrainerX
from vltune.registry import TRAINERS

_NO_TRAIN = dict(trainable=False, trainable_params=0)


@TRAINERS.register("ZeroshotCLIP", aliases=("ZeroShotCLIP",), family="zero-shot", test_overrides=_NO_TRAIN,
                   presets=dict(b2n="vit_b16", xd="vit_b16", fewshot="vit_b16"), eval_only=True)
class ZeroshotCLIP(TrainerX):
    """Frozen CLIP with hand-written prompts; class text features are computed once per evaluation."""

    def build_model(self) -> None:
        self.model = self.build_clip()
        self._weights: torch.Tensor | None = None

    def templates(self) -> list[str]:
        return [self.template]

    def before_evaluate(self) -> None:
        self._weights = self.model.zero_shot_classifier(self.classnames, self.templates())

    def after_evaluate(self) -> None:
        self._weights = None

    def inference(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, C) logits."""
        weights = self._weights if self._weights is not None else self.model.zero_shot_classifier(
            self.classnames, self.templates())
        return self.model.similarity(self.model.encode_image(images, normalize=True), weights)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(self.inference(batch["img"]), batch["label"])}


_ZS_YAML = "configs/trainers/ZeroshotCLIP/vit_b16.yaml"  # the ensemble shares ZeroshotCLIP's yaml (repo-relative)


@TRAINERS.register("ZeroshotCLIP2", family="zero-shot", test_overrides=_NO_TRAIN,
                   presets=dict(b2n=_ZS_YAML, xd=_ZS_YAML, fewshot=_ZS_YAML), eval_only=True)
class ZeroshotCLIP2(ZeroshotCLIP):
    """Prompt ensemble: mean of normalised features over 7 templates (+ the dataset's own)."""

    def templates(self) -> list[str]:
        templates = list(IMAGENET_TEMPLATES_SELECT)
        if self.cfg.DATASET.NAME != "ImageNet":
            templates.append(self.template)
        return templates
