"""KgCoOp: Yao, Zhang, Xu, *Visual-Language Prompt Tuning with Knowledge-guided Context Optimization*, CVPR 2023
(https://arxiv.org/abs/2303.13283). Reference: htyao89/KgCoOp ``KgCoOp/trainers/kgcoop.py``.

Trainable: CoOp's context vectors ``ctx`` (the paper's configs: M = 4 from "a photo of a", 4 × 512 = 2,048 on
ViT-B/16), registered as ``prompt_learner``.

CoOp plus a knowledge-guided regulariser that keeps the learned class text features t_c close to the frozen
hand-crafted ones w_c (computed once, fp32, with the same frozen text encoder)::

    L = CE(τ f Tᵀ, y) + W · L_kg,    L_kg = (1/C) Σ_c ‖t_c − w_c‖² / 2  (= 1 − (1/C) Σ_c cos(t_c, w_c))

The paper writes L_kg without the ½; the official code computes 1 − mean cos, which is the same as the form above
because t_c and w_c are unit vectors. W = ``TRAINER.COOP.W`` keeps the official code's meaning, so the published W
values (8.0 official, 2.0 in DePT's KgCoOp runs, 1.5 in SkipTuning's) reproduce the runs they were tuned for.
The regulariser is CoOp's ``extra_loss`` hook, so plugins built on CoOp's loss (DePT) add it for free.

Departures from upstream: no second CLIP is loaded for w_c (the backbone is frozen, so it is the teacher); the
context phrase is ``TRAINER.COOP.CTX_INIT`` as given (upstream hard-codes "a photo of a" whenever CTX_INIT is
truthy, and its yaml files write ``CTX_INIT: True``, which vltune's string-typed key rejects: write the phrase);
the unused bias vector and meta-net upstream saves in every checkpoint do not exist here; trainability is CoOp's
declared set, not a ``"ctx"`` name filter; the ``amp`` path keeps L_kg (upstream's drops it).
"""

from __future__ import annotations

from typing import Any

import torch
from yacs.config import CfgNode as CN

from trainers.coop import CoOp, SimParts
from vltune.registry import TRAINERS

#: KgCoOp's hand-crafted templates where they differ from the dataset's own (CoOp's CUSTOM_TEMPLATES), keyed by
#: ``DATASET.NAME`` (upstream ``CUSTOM_TEMPLATES`` in KgCoOp/trainers/kgcoop.py)
KGCOOP_TEMPLATES = {"DescribableTextures": "a photo of a {}, a type of texture."}


def knowledge_loss(text: torch.Tensor, hand_crafted: torch.Tensor) -> torch.Tensor:
    """½ · mean over classes of ‖t_c − w_c‖² (= 1 − mean cos for unit vectors), a scalar.

    Input: normalised learned class features ``text`` (C, E), or per image (B, C, E); normalised hand-crafted
    features ``hand_crafted`` (C, E). Exactly zero when the two are equal.
    """
    return 0.5 * (text.float() - hand_crafted.float()).pow(2).sum(dim=-1).mean()  # fp32 under autocast too


@TRAINERS.register("KgCoOp", family="prompt", test_overrides=dict(trainable_params=16 * 64),
                   presets=dict(b2n="vit_b16_ep100_ctxv1", xd="vit_b16_ep100_ctxv1"),
                   no_preset=dict(fewshot="KgCoOp's few-shot settings are still to be checked against the paper "
                                  "(methods.md §5 and §15); there is no few-shot config for it"))
class KgCoOp(CoOp):
    """CoOp regularised toward the hand-crafted prompt's text features (W = ``TRAINER.COOP.W``)."""

    skip_plugin = True  # CoOp's features; L_kg over CSkip's kept classes

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        if cfg.TRAINER.COOP.W < 0:
            raise ValueError(f"TRAINER.COOP.W (KgCoOp's weight of L_kg) must be >= 0, got {cfg.TRAINER.COOP.W}")

    def build_model(self) -> None:
        super().build_model()
        self.kg_weight = float(self.cfg.TRAINER.COOP.W)
        self.kg_template = KGCOOP_TEMPLATES.get(self.cfg.DATASET.NAME, self.template)
        self._hand_crafted: torch.Tensor | None = None
        if not self.eval_only:  # only the training loss needs w_c
            self.model.to(self.device)  # encode on the run's device, in fp32 (before fp16 casts frozen weights)
            self._hand_crafted = self.hand_crafted_features()

    def hand_crafted_features(self) -> torch.Tensor:
        """w_c: normalised frozen text features of the hand-crafted prompt per class, (C, E); rebuilt from the class
        names, never saved."""
        return self.model.clip.zero_shot_classifier(self.classnames, [self.kg_template]).detach()

    def extra_loss(self, batch: dict[str, Any], parts: SimParts) -> torch.Tensor:
        if self._hand_crafted is None:
            self._hand_crafted = self.hand_crafted_features()
        w = self._hand_crafted if "classes" not in batch else self._hand_crafted[batch["classes"]]  # CSkip's subset
        return self.kg_weight * knowledge_loss(parts.text, w)
