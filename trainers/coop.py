"""CoOp: Zhou, Yang, Loy, Liu, *Learning to Prompt for Vision-Language Models*, IJCV 2022
(https://arxiv.org/abs/2109.01134). Reference: KaiyangZhou/CoOp ``trainers/coop.py``.

Trainable: the context vectors ``ctx`` (M × D, or C × M × D with CSC), registered as ``prompt_learner``.
Prompt for class c: ``[SOS][ctx][name_c][.][EOS]`` (``end``), ctx split around the name (``middle``) or after it
(``front``). Both encoders are frozen; L = CE(τ · f · Tᵀ, y).

Departures from upstream: ``CTX_INIT`` counts BPE tokens, not words; the prompt prefix/suffix are non-persistent
buffers rebuilt from the class names (never saved), so checkpoints hold ``ctx`` only and load strictly; the
image features are computed without autograd (nothing on the image path trains); text features are computed once
per evaluation instead of per test batch.
"""

from __future__ import annotations

import torch
from yacs.config import CfgNode as CN

from vltune.registry import TRAINERS
from vltune.tuners.prompting import PromptLearner, PromptModel, PromptTrainer, check_context


def add_config(cfg: CN) -> None:
    """``TRAINER.COOP`` (also read by methods built on CoOp's context: ProGrad, KgCoOp, TCP)."""
    cfg.TRAINER.COOP = CN()
    cfg.TRAINER.COOP.N_CTX = 16  # number of context vectors M (ignored when CTX_INIT is set)
    cfg.TRAINER.COOP.CSC = False  # class-specific context (random init only)
    cfg.TRAINER.COOP.CTX_INIT = ""  # initialisation phrase, e.g. "a photo of a" (M = its token count)
    cfg.TRAINER.COOP.PREC = ""  # fp16 (CUDA) | amp | fp32; empty: TRAINER.PREC (default fp16, as upstream)
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "end"  # end | middle | front
    cfg.TRAINER.COOP.W = 8.0  # the knowledge-loss weight of KgCoOp and TCP (their official key); CoOp ignores it
    cfg.TRAINER.COOP.ALPHA = 1.0  # declared by the Skip Tuning repo, so its yaml files merge; no method reads it


@TRAINERS.register("CoOp", add_config=add_config, family="prompt", test_overrides=dict(trainable_params=16 * 64),
                   presets=dict(b2n="vit_b16_ep100", xd="vit_b16_ep50",  # few-shot: 50/100/200 epochs by K
                                fewshot={1: "vit_b16_ep50", 2: "vit_b16_ep100", 4: "vit_b16_ep100", 8: "vit_b16",
                                         16: "vit_b16"}))
class CoOp(PromptTrainer):
    """Context optimisation: learn the prompt's context words, keep CLIP frozen."""

    config_node = "COOP"
    config_reads = ("TRAINER.COOP",)  # also read by the methods that build on CoOp's prompt learner

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        check_context(cfg.TRAINER.COOP, "TRAINER.COOP")

    def build_model(self) -> None:
        c = self.cfg.TRAINER.COOP
        clip = self.build_clip()
        prompt_learner = PromptLearner(clip, self.classnames, c.N_CTX, c.CTX_INIT, c.CSC, c.CLASS_TOKEN_POSITION)
        self.model = PromptModel(clip, prompt_learner)
        self.register_model("prompt_learner", prompt_learner)

    skip_plugin = True

    def image_is_frozen(self) -> bool:
        return True

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(images)
