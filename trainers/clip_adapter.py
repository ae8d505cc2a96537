"""CLIP-Adapter: Gao, Geng, Zhang, Ma, Fang, Zhang, Li, Qiao, *CLIP-Adapter: Better Vision-Language Models with
Feature Adapters*, IJCV 2024 (https://arxiv.org/abs/2110.04544). Reference: gaopengcuhk/CLIP-Adapter
``clip_adapter.py``; Koorye/SkipTuning ``trainers/baselines/clip_adapter.py`` and ``clip_adapter_origin.py``.

Trainable: a bias-free visual adapter ``A(x) = ReLU(W₂ ReLU(W₁ x))`` (W₁: d/r × d, W₂: d × d/r, r =
``TRAINER.CLIP_ADAPTER.REDUCTION``), registered as ``clip_adapter``. With f = E_v(x) (un-normalised, as upstream)
and α = ``TRAINER.CLIP_ADAPTER.RATIO``::

    f' = α · A(f) + (1 − α) · f,    logits = τ · norm(f') · Wᵀ,    L = CE

where W are the zero-shot text features of the dataset's template (frozen CLIP). ``CLIPAdapter`` computes W once
per run (the ``zero_shot`` teacher, rebuilt from the class names, never saved); ``OriginCLIPAdapter`` re-encodes every
class prompt on each training forward, as the original code does (same maths, higher cost) and once per evaluation.

Departures from upstream: α and the reduction are config keys (upstream hard-codes 0.2 and 4); d follows the
backbone's embedding width (the original hard-codes 1024, RN50); W is not recomputed per test batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from vltune.registry import TRAINERS
from vltune.tuners.prompting import Adapter, PromptTrainer


def add_config(cfg: CN) -> None:
    """``TRAINER.CLIP_ADAPTER`` (shared by ``CLIPAdapter`` and ``OriginCLIPAdapter``)."""
    cfg.TRAINER.CLIP_ADAPTER = CN()
    cfg.TRAINER.CLIP_ADAPTER.RATIO = 0.2  # residual ratio α: f' = α·A(f) + (1 − α)·f
    cfg.TRAINER.CLIP_ADAPTER.REDUCTION = 4  # bottleneck width d / REDUCTION
    cfg.TRAINER.CLIP_ADAPTER.PREC = ""  # fp16 | amp | fp32; empty: TRAINER.PREC


class CLIPAdapterModel(nn.Module):
    """Frozen CLIP + visual adapter. ``forward(f)``: frozen CLIP image features (B, E) → adapted, normalised (B, E)."""

    def __init__(self, clip: nn.Module, adapter: Adapter, ratio: float) -> None:
        super().__init__()
        self.clip, self.adapter, self.ratio = clip, adapter, ratio

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.ratio * self.adapter(f) + (1 - self.ratio) * f, dim=-1)


_TINY = dict(trainable_params=2 * 64 * 16)  # tiny CLIP: embed dim 64, reduction 4 → W₁ 16×64 + W₂ 64×16


_NO_FEWSHOT = dict(fewshot="CLIP-Adapter's few-shot runs are RN50, with α and the reduction per dataset still to be "
                           "checked against the paper (methods.md §11); there is no ViT-B/16 few-shot config for it")


@TRAINERS.register("CLIPAdapter", add_config=add_config, family="adapter", test_overrides=_TINY,
                   presets=dict(b2n="vit_b16_ep10_bs4", xd="vit_b16_ep10_bs4"), no_preset=_NO_FEWSHOT)
class CLIPAdapter(PromptTrainer):
    """A residual feature adapter on the image embedding; zero-shot text weights computed once per run."""

    config_node = "CLIP_ADAPTER"

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        c = cfg.TRAINER.CLIP_ADAPTER
        if not 0.0 <= c.RATIO <= 1.0:
            raise ValueError(f"TRAINER.CLIP_ADAPTER.RATIO must be in [0, 1], got {c.RATIO}")
        if c.REDUCTION < 1:
            raise ValueError(f"TRAINER.CLIP_ADAPTER.REDUCTION must be >= 1, got {c.REDUCTION}")

    def build_model(self) -> None:
        c = self.cfg.TRAINER.CLIP_ADAPTER
        clip = self.build_clip()
        if clip.embed_dim // c.REDUCTION < 1:
            raise ValueError(f"TRAINER.CLIP_ADAPTER.REDUCTION {c.REDUCTION} exceeds the embedding width "
                             f"{clip.embed_dim}")
        adapter = Adapter(clip.embed_dim, c.REDUCTION)
        self.model = CLIPAdapterModel(clip, adapter, float(c.RATIO))
        self.register_model("clip_adapter", adapter)

    def build_teachers(self) -> None:
        self.teachers["zero_shot"] = self.encode_classes()

    def encode_classes(self) -> torch.Tensor:
        """Zero-shot text features of the current class names with the dataset template (frozen text encoder)."""
        return self.backbone.zero_shot_classifier(self.classnames, [self.template])

    def class_weights(self) -> torch.Tensor:
        """The text weights a training forward uses: computed once per run, by ``build_teachers``."""
        return self.teacher("zero_shot")

    skip_plugin = True

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the image encoder is frozen; only the adapter trains
            return self.backbone.encode_image(images)

    def image_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        return self.model(frozen)

    def image_is_frozen(self) -> bool:
        return True

    def class_text_features(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.class_weights()
        return weights if classes is None else weights[classes.to(weights.device)]


@TRAINERS.register("OriginCLIPAdapter", add_config=add_config, family="adapter", test_overrides=_TINY,
                   presets=dict(b2n="vit_b16_ep10_bs4", xd="vit_b16_ep10_bs4"), no_preset=_NO_FEWSHOT)
class OriginCLIPAdapter(CLIPAdapter):
    """CLIP-Adapter as originally coded: every training forward re-encodes all class prompts (for cost tables)."""

    skip_plugin = True

    def build_teachers(self) -> None:
        """Nothing to cache: the class prompts are re-encoded by every forward."""

    def class_weights(self) -> torch.Tensor:
        return self.encode_classes()

    def class_text_features(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        if classes is None:
            return self.encode_classes()
        return self.backbone.zero_shot_classifier([self.classnames[i] for i in classes.tolist()], [self.template])
