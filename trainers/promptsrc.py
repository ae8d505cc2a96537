"""PromptSRC: Khattak, Wasim, Naseer, Khan, Yang, Khan, *Self-regulating Prompts: Foundational Model Adaptation
without Forgetting*, ICCV 2023 (https://arxiv.org/abs/2307.06948). Reference: muzairkhattak/PromptSRC
``trainers/promptsrc.py`` on its IVLP CLIP fork.

Trainable: independent deep prompts, registered together as ``prompt_learner``: the text context ``ctx`` (M_t × D_t,
initialised from ``CTX_INIT``) plus ``text_prompts`` ((depth_t − 1) × M_t × D_t), and ``visual_prompts``
(depth_v × M_v × D_v); 46,080 parameters on ViT-B/16 with 4+4 tokens at depth 9/9 (methods.md §7).

::

    text block 0:      [SOS][ctx][name_c][.][EOS]              (CoOp's prompt, ctx from "a photo of a")
    text block i<d_t:  tokens 1..M_t ← text_prompts[i − 1]     (fresh tokens per block, no coupling to vision)
    image block 0:     tokens ← [tokens, ln_pre(visual_prompts[0])]   (appended after the patches, as IVLP)
    image block i<d_v: last M_v tokens ← visual_prompts[i]
    L = CE(s, y) + 25 · L1(t̃, w̄) + 10 · L1(f̃, f⁰) + KL(softmax z ‖ softmax s)

``w̄_c`` is the renormalised mean of the frozen text features over upstream's 60 ImageNet templates
(``PROMPTSRC_TEMPLATES``, from its ``trainers/imagenet_templates.py``, not CLIP's 80; raw features averaged), ``f⁰``
the frozen image feature, ``z = τ f⁰ w̄ᵀ``; "frozen CLIP" is the same backbone without the hooks (no second CLIP).
After every epoch e (1-based) the prompts are added to a running Gaussian-weighted aggregate with
``g_e ∝ N(e; GPA_MEAN, GPA_STD)`` normalised over ``e = 1..MAX_EPOCH``; after the last epoch the prompts are replaced
by it before the final test and before the last checkpoint is written, so eval jobs load the GPA prompts.

Resume: the running aggregate lives in persistent ``gpa_*`` buffers of ``prompt_learner``, so every checkpoint holds
the aggregate of the epochs it has seen (the checkpoint is about twice the prompt size) and a resumed run continues
it exactly.

Departures from upstream (methods.md §7 defects): GPA aggregates the trainable prompts only (upstream sums the full
state dict, frozen CLIP included) and runs in ``after_epoch`` instead of inside ``forward_backward``; precision (amp
included) is the engine's; no frozen image encoder is saved; a depth of 0 is allowed (no prompts in that tower; text
depth 0 keeps the frozen ``CTX_INIT`` prompt), which makes the method exactly zero-shot CLIP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from vltune.clip import PROMPTSRC_TEMPLATES
from vltune.registry import TRAINERS
from vltune.tuners.deep_prompts import DeepPromptModel, DeepPrompts
from vltune.tuners.prompting import PromptLearner, PromptTrainer, SimParts

KL_TEMPERATURE = 1.0  # upstream divides both logits by 1 and scales the KL by 1 · 1 (T²)


def add_config(cfg: CN) -> None:
    """``TRAINER.PROMPTSRC`` (upstream's keys and base-to-new defaults)."""
    cfg.TRAINER.PROMPTSRC = CN()
    cfg.TRAINER.PROMPTSRC.N_CTX_TEXT = 4  # M_t, text prompt tokens per block (= CTX_INIT's token count if set)
    cfg.TRAINER.PROMPTSRC.N_CTX_VISION = 4  # M_v, vision prompt tokens per block
    cfg.TRAINER.PROMPTSRC.CTX_INIT = "a photo of a"  # text ctx initialisation phrase; "" = random (needs depth >= 1)
    cfg.TRAINER.PROMPTSRC.PREC = "fp16"  # fp16 (CUDA) | amp | fp32; empty: TRAINER.PREC
    cfg.TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT = 9  # text blocks 0..d-1 get prompts; 0 = hand-crafted prompt only
    cfg.TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION = 9  # image blocks 0..d-1 get prompts; 0 = no vision prompts
    cfg.TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT = 25  # weight of L1(prompted text feats, zero-shot text feats)
    cfg.TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT = 10  # weight of L1(prompted image feats, zero-shot image feats)
    cfg.TRAINER.PROMPTSRC.GPA_MEAN = 15  # μ of the Gaussian over epochs 1..MAX_EPOCH (prompt aggregation)
    cfg.TRAINER.PROMPTSRC.GPA_STD = 1  # σ > 0 of that Gaussian (ints as upstream, so its yaml files load)


def gpa_weights(mean: float, std: float, n_epochs: int) -> torch.Tensor:
    """Normalised Gaussian weights ``g_e = N(e; mean, std) / Σ N`` for epochs e = 1..n_epochs. Output: (n,) float64.

    Computed as a softmax of the log-density (the constant 1/(σ√2π) cancels), so far-away means do not underflow.
    """
    e = torch.arange(1, n_epochs + 1, dtype=torch.float64)
    return torch.softmax(-0.5 * ((e - mean) / std) ** 2, dim=0)


class SRCPromptLearner(PromptLearner):
    """CoOp's text prompt (ctx = text prompts of block 0), deep text prompts and vision prompts, plus the GPA state.

    ``forward()`` is CoOp's: prompt embeddings (C, L, D_t) and EOT indices (C,).

    Args:
        clip: the backbone (token embeddings, widths).
        classnames: raw class names.
        n_ctx_text: M_t (must equal CTX_INIT's token count when that is set).
        ctx_init: initialisation phrase of ctx.
        depth_text: number of text blocks with prompts (0: ctx is a frozen buffer).
        n_ctx_vision: M_v.
        depth_vision: number of image blocks with prompts.
    """

    def __init__(self, clip: nn.Module, classnames: list[str], n_ctx_text: int, ctx_init: str, depth_text: int,
                 n_ctx_vision: int, depth_vision: int) -> None:
        super().__init__(clip, classnames, n_ctx_text, ctx_init, False, "end")
        if self.n_ctx != n_ctx_text:
            raise ValueError(f"TRAINER.PROMPTSRC.CTX_INIT {ctx_init!r} has {self.n_ctx} tokens but N_CTX_TEXT is "
                             f"{n_ctx_text}; make them equal")
        if depth_text == 0:  # the hand-crafted prompt, frozen (and not saved)
            ctx = self.ctx.detach()
            del self.ctx
            self.register_buffer("ctx", ctx, persistent=False)
        # upstream: deep text prompts and VPT tokens ~ N(0, 0.02²)
        self.text_prompts = nn.Parameter(torch.randn(max(depth_text - 1, 0), self.n_ctx, clip.width_text) * 0.02)
        self.visual_prompts = nn.Parameter(torch.randn(depth_vision, n_ctx_vision, clip.width_image) * 0.02)
        for name, p in list(self.named_parameters()):  # the running GPA aggregate, checkpointed for resume
            self.register_buffer(f"gpa_{name}", torch.zeros_like(p, dtype=torch.float32))

    @torch.no_grad()
    def gpa_accumulate(self, weight: float) -> None:
        """θ_GPA ← θ_GPA + weight · θ for every prompt tensor."""
        for name, p in self.named_parameters():
            getattr(self, f"gpa_{name}").add_(p.float(), alpha=weight)

    @torch.no_grad()
    def gpa_load(self) -> None:
        """θ ← θ_GPA (after the last epoch)."""
        for name, p in self.named_parameters():
            p.copy_(getattr(self, f"gpa_{name}"))

    def text_hooks(self) -> DeepPrompts | None:
        """``text_prompts[i − 1]`` before text blocks 1..d_t − 1 (block 0's prompts are in the embeddings)."""
        return DeepPrompts(text=[None, *self.text_prompts]) if self.text_prompts.shape[0] else None

    def image_hooks(self, clip: nn.Module) -> DeepPrompts | None:
        """``visual_prompts[i]`` before image blocks 0..d_v − 1 (block 0's appended after ``ln_pre``, as IVLP)."""
        if not self.visual_prompts.shape[0]:
            return None
        return DeepPrompts(vision=list(self.visual_prompts), ln_pre=clip.ln_pre)


@torch.no_grad()
def ensemble_text_features(clip: nn.Module, classnames: list[str], templates: tuple[str, ...] = PROMPTSRC_TEMPLATES,
                           batch_size: int = 1000) -> torch.Tensor:
    """w̄: the mean of the RAW frozen text features over ``templates``, then normalised (upstream's
    ``fixed_embeddings``, normalised at use). Output: (C, E) float32."""
    rows = []
    for name in classnames:
        prompts = [t.format(name.replace("_", " ")) for t in templates]
        rows.append(clip.encode_text(clip.tokenize(prompts), batch_size=batch_size).float().mean(dim=0))
    return F.normalize(torch.stack(rows), dim=-1)


def kl_to_zero_shot(logits: torch.Tensor, zero_shot_logits: torch.Tensor, t: float = KL_TEMPERATURE) -> torch.Tensor:
    """``Σ p_z (log p_z − log p_s) · T² / numel`` with p = softmax(· / T): upstream's ``kl_div(..., reduction='sum',
    log_target=True) / logits.numel()``. Input: (B, C) each."""
    return F.kl_div(F.log_softmax(logits.float() / t, dim=1), F.log_softmax(zero_shot_logits.float() / t, dim=1),
                    reduction="sum", log_target=True) * (t * t) / logits.numel()


@TRAINERS.register("PromptSRC", add_config=add_config, family="prompt",
                   test_overrides=dict(trainable_params=1024,  # tiny CLIP, 4+4 tokens, depth 2/2: 2·4·64 + 2·4·64
                                       opts={"TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT": 2,
                                             "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION": 2,
                                             "TRAINER.PROMPTSRC.PREC": "fp32"}),
                   presets=dict(b2n="vit_b16_c2_ep20_batch4_4+4ctx", xd="vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets",
                                fewshot="vit_b16_c2_ep50_batch4_4+4ctx_few_shot"))
class PromptSRC(PromptTrainer):
    """Deep vision-language prompts regulated towards frozen CLIP, aggregated over epochs with Gaussian weights."""

    config_node = "PROMPTSRC"

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        c = cfg.TRAINER.PROMPTSRC
        if c.PROMPT_DEPTH_TEXT < 0 or c.PROMPT_DEPTH_VISION < 0:
            raise ValueError("TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT/VISION must be >= 0")
        if c.PROMPT_DEPTH_TEXT == 0 and not c.CTX_INIT:
            raise ValueError("TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT 0 keeps the prompt frozen: set CTX_INIT")
        if c.N_CTX_TEXT < 1 or c.N_CTX_VISION < 1:
            raise ValueError("TRAINER.PROMPTSRC.N_CTX_TEXT and N_CTX_VISION must be >= 1")
        if c.GPA_STD <= 0:
            raise ValueError(f"TRAINER.PROMPTSRC.GPA_STD must be > 0, got {c.GPA_STD}")

    def build_model(self) -> None:
        c = self.cfg.TRAINER.PROMPTSRC
        clip = self.build_clip()
        for tower, depth, n in (("TEXT", c.PROMPT_DEPTH_TEXT, clip.n_layers_text),
                                ("VISION", c.PROMPT_DEPTH_VISION, clip.n_layers_image if clip.is_vit else 0)):
            if depth > n:
                raise ValueError(f"TRAINER.PROMPTSRC.PROMPT_DEPTH_{tower} {depth} exceeds the {n} blocks of "
                                 f"{self.cfg.MODEL.BACKBONE.NAME} (ViT towers only for vision prompts)")
        learner = SRCPromptLearner(clip, self.classnames, c.N_CTX_TEXT, c.CTX_INIT, c.PROMPT_DEPTH_TEXT,
                                   c.N_CTX_VISION, c.PROMPT_DEPTH_VISION)
        self.model = DeepPromptModel(clip, learner)
        self.register_model("prompt_learner", learner)
        self.text_weight, self.image_weight = float(c.TEXT_LOSS_WEIGHT), float(c.IMAGE_LOSS_WEIGHT)
        self.gpa_mean, self.gpa_std = float(c.GPA_MEAN), float(c.GPA_STD)

    def build_teachers(self) -> None:
        """w̄ (C, E), for training only: an eval job on 1000 classes would encode 60,000 prompts for nothing."""
        if not self.eval_only:
            self.teachers["text"] = ensemble_text_features(self.backbone, self.classnames)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.prompt_learner.parameters() if p.numel()]  # depth 0/1 leaves empty tensors

    def src_losses(self, images: torch.Tensor, parts: SimParts) -> dict[str, torch.Tensor]:
        """The self-regulating terms (unweighted): L1 text, L1 image and KL to the zero-shot logits."""
        w = self.teacher("text")
        with torch.no_grad():
            f0 = self.backbone.encode_image(images, normalize=True).float()
            z = self.similarity(f0, w)
        return {"text": F.l1_loss(parts.text.float(), w), "image": F.l1_loss(parts.image.float(), f0),
                "kl": kl_to_zero_shot(parts.logits, z)}

    def regularizers(self, batch: dict[str, Any], parts: SimParts) -> dict[str, torch.Tensor]:
        """``TEXT_LOSS_WEIGHT · L1_text``, ``IMAGE_LOSS_WEIGHT · L1_image`` and ``1 · KL``, as three logged terms."""
        src = self.src_losses(batch["img"], parts)
        return {"text_l1": self.text_weight * src["text"], "image_l1": self.image_weight * src["image"],
                "kl": src["kl"]}

    def after_epoch(self) -> None:
        """GPA: add this epoch's prompts with weight g_{epoch+1}; after the last epoch load the aggregate, before
        the base class writes the last checkpoint (which eval jobs load) and before the final test."""
        learner = self.model.prompt_learner
        learner.gpa_accumulate(float(gpa_weights(self.gpa_mean, self.gpa_std, self.max_epoch)[self.epoch]))
        if self.epoch + 1 == self.max_epoch:
            learner.gpa_load()
        super().after_epoch()
