"""MaPLe: Khattak, Rasheed, Maaz, Khan, Khan, *MaPLe: Multi-modal Prompt Learning*, CVPR 2023
(https://arxiv.org/abs/2210.03117). Reference: muzairkhattak/multimodal-prompt-learning ``trainers/maple.py`` and
its forked ``clip/model.py`` (methods.md §6).

Trainable (registered as ``prompt_learner``, upstream's key names): ``ctx`` = P_0 (M × D_t), ``proj`` = F_0
(Linear D_t → D_v), and for i = 1..J−1 ``compound_prompts_text.{i-1}`` = P_i (M × D_t, N(0, 0.02²)) and
``compound_prompt_projections.{i-1}`` = F_i (Linear D_t → D_v). ViT-B/16, M = 2, J = 9: 3,555,072 parameters.
Init as upstream: F_0 is its own Linear; F_1..F_{J−1} are copies of one further Linear drawn after the P_i (equal
to each other at init, not to F_0).

::

    text prompt of class c: [SOS][a photo]["of a"][name_c][.][EOS]    (CTX_INIT "a photo of a", M = 2)
    before text block i < J:   positions 1..M ← P_i (+ the positional embedding for i = 0)
    before image block 0:      append ln_pre(F_0(P_0)) after the CLS and patch tokens (no positional embedding)
    before image block 0<i<J:  the last M tokens ← F_i(P_i)
    blocks ≥ J carry whatever tokens arrive;  logits = τ · f · Tᵀ;  L = CE

So depth J means exactly blocks 0..J−1 of each tower receive fresh prompts, and the vision prompts are the projected
text prompts of the same depth (the coupling). ``PROMPT_DEPTH 0`` inserts nothing: the text prompt is the hand-written
phrase ``"{CTX_INIT} {name}."`` and the image tower is untouched, i.e. zero-shot CLIP through MaPLe's path (nothing to
train; eval-only).

Departures from upstream (methods.md §6): no forked CLIP; P_0 enters as a block-0 hook (replacing the init phrase's
first M tokens after the positional embedding is added: the same sum upstream builds), and the vision prompts are
appended after ``ln_pre`` as ``ln_pre(F_0(P_0))`` (LayerNorm is per token, so this equals upstream's append-then-norm).
Prompts follow the backbone dtype (no hard-coded ``.half()``); checkpoints hold the trainable tensors only (upstream
saves the whole CustomCLIP); text features are computed once per evaluation. A ``CTX_INIT`` with fewer than M tokens
is an error (upstream silently switches to random init when M > 4).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from yacs.config import CfgNode as CN

from trainers.coop import CoOp
from trainers.dept import register_dept
from vltune.clip import BlockHooks
from vltune.registry import TRAINERS


def add_config(cfg: CN) -> None:
    """``TRAINER.MAPLE`` (upstream's keys and defaults)."""
    cfg.TRAINER.MAPLE = CN()
    cfg.TRAINER.MAPLE.N_CTX = 2  # M, prompt tokens per layer and tower
    cfg.TRAINER.MAPLE.CTX_INIT = "a photo of a"  # P_0 = its first M token embeddings; "" = random "X X ..." prompt
    cfg.TRAINER.MAPLE.PREC = ""  # fp16 (CUDA) | amp | fp32; empty: TRAINER.PREC (default fp16, as upstream)
    cfg.TRAINER.MAPLE.PROMPT_DEPTH = 9  # J: blocks 0..J-1 of both towers get prompts (1..n_layers; 0 = none, eval)


class MaPLePromptLearner(nn.Module):
    """Deep text prompts P_0..P_{J−1} and their couplings F_0..F_{J−1} into the image tower.

    ``forward()``: the hand-written prompt embeddings (C, L, D_t) (without positions; positions 1..M hold the init
    phrase, replaced at block 0) and the EOT indices (C,). ``text_prompts()`` / ``vision_prompts()``: J tensors of
    (M, D_t) / (M, D_v).

    Args:
        clip: the backbone (tokenizer, token embeddings, widths).
        classnames: raw class names (``_`` becomes a space here).
        n_ctx: M.
        ctx_init: initialisation phrase for P_0 (its first M BPE tokens); "" for N(0, 0.02²).
        depth: J, 0 ≤ J ≤ the number of blocks of either tower.
    """

    def __init__(self, clip: nn.Module, classnames: list[str], n_ctx: int, ctx_init: str, depth: int) -> None:
        super().__init__()
        names = [c.replace("_", " ") for c in classnames]
        d_text, d_image = clip.width_text, clip.width_image
        with torch.no_grad():
            if ctx_init:
                phrase = ctx_init.replace("_", " ")
                ids = clip.tokenize([phrase])
                if int(clip.eot_index(ids)[0]) - 1 < n_ctx:
                    raise ValueError(f"TRAINER.MAPLE.CTX_INIT {ctx_init!r} has fewer than N_CTX={n_ctx} tokens")
                ctx = clip.token_embedding(ids)[0, 1:1 + n_ctx].float().clone()
            else:
                phrase = " ".join(["X"] * n_ctx)
                ctx = torch.empty(n_ctx, d_text).normal_(std=0.02)
            ids = clip.tokenize([f"{phrase} {name}." for name in names])
            eot = clip.eot_index(ids)
            embeds = clip.token_embedding(clip.cut_text(ids, eot)).clone()
        self.n_ctx, self.depth = n_ctx, depth
        self.register_buffer("token_embeds", embeds, persistent=False)  # rebuilt from the class names
        self.register_buffer("eot", eot, persistent=False)
        if depth == 0:
            return
        # Upstream's order of random draws: (random P_0 above), F_0, P_1..P_{J-1}, then ONE further Linear that
        # every deeper layer clones (_get_clones): F_1..F_{J-1} start equal to each other, not to F_0, and train
        # apart. The Linear is drawn even at J = 1 (no clones), as upstream, so later draws stay aligned.
        self.ctx = nn.Parameter(ctx)
        self.proj = nn.Linear(d_text, d_image)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, d_text).normal_(std=0.02)) for _ in range(depth - 1)])
        single_layer = nn.Linear(d_text, d_image)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single_layer) for _ in range(depth - 1)])

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_embeds, self.eot

    def text_prompts(self) -> list[torch.Tensor]:
        """[P_0, …, P_{J−1}], each (M, D_t)."""
        return [] if self.depth == 0 else [self.ctx, *self.compound_prompts_text]

    def vision_prompts(self) -> list[torch.Tensor]:
        """[F_0(P_0), …, F_{J−1}(P_{J−1})], each (M, D_v): the coupling of each layer's text prompt."""
        projections = [] if self.depth == 0 else [self.proj, *self.compound_prompt_projections]
        return [f(p) for f, p in zip(projections, self.text_prompts())]


class DeepPrompts(BlockHooks):
    """Before block i < J: the i-th prompts enter the tower (``MaPLePromptLearner`` docstring); other blocks as is.

    Args:
        text: [P_0, …] (M, D_t) each, or None to leave the text tower alone.
        vision: [F_0(P_0), …] (M, D_v) each, or None to leave the image tower alone.
        text_pos: the positional embedding of positions 1..M (M, D_t), added to P_0.
        ln_pre: the image tower's ``ln_pre``, applied to the first-layer vision prompts.
    """

    def __init__(self, text: list[torch.Tensor] | None = None, vision: list[torch.Tensor] | None = None,
                 text_pos: torch.Tensor | None = None, ln_pre: nn.Module | None = None) -> None:
        self.text, self.vision, self.text_pos, self.ln_pre = text or [], vision or [], text_pos, ln_pre

    def before_block(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        prompts = self.text if tower == "text" else self.vision
        if i >= len(prompts):
            return x
        p = prompts[i].to(x.dtype)
        n = p.shape[0]
        if tower == "text":
            if i == 0:
                p = p + self.text_pos.to(x.dtype)
            return torch.cat([x[:, :1], p.expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)
        if i == 0:
            return torch.cat([x, self.ln_pre(p).expand(x.shape[0], -1, -1)], dim=1)
        return torch.cat([x[:, :-n], p.expand(x.shape[0], -1, -1)], dim=1)


class MaPLeModel(nn.Module):
    """Frozen CLIP + MaPLe's prompt learner. ``forward`` (B, 3, H, W) → logits (B, C)."""

    def __init__(self, clip: nn.Module, prompt_learner: MaPLePromptLearner) -> None:
        super().__init__()
        self.clip, self.prompt_learner = clip, prompt_learner

    def text_hooks(self) -> DeepPrompts:
        n = self.prompt_learner.n_ctx
        return DeepPrompts(text=self.prompt_learner.text_prompts(),
                           text_pos=self.clip.model.positional_embedding[1:1 + n])

    def image_hooks(self) -> DeepPrompts:
        return DeepPrompts(vision=self.prompt_learner.vision_prompts(), ln_pre=self.clip.model.visual.ln_pre)

    def text_features(self, normalize: bool = True) -> torch.Tensor:
        """Class text features (C, E) under the deep text prompts; normalised unless ``normalize`` is False."""
        prompts, eot = self.prompt_learner()
        return self.clip.encode_text_from_embeddings(prompts, eot, hooks=self.text_hooks(), normalize=normalize)

    def image_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features (B, E) under the coupled vision prompts (differentiable: F_i and P_i train); normalised
        unless ``normalize`` is False."""
        return self.clip.encode_image(images, hooks=self.image_hooks(), normalize=normalize)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        image = self.image_features(images)
        text = self.text_features() if text_features is None else text_features
        return self.clip.logit_scale * image @ text.t().to(image.dtype)


@TRAINERS.register("MaPLe", add_config=add_config, family="prompt",
                   test_overrides=dict(trainable_params=8576,  # M = 2, J = 2, widths 64: 2·128 P + 2·4,160 F
                                       opts={"TRAINER.MAPLE.PROMPT_DEPTH": 2}),
                   presets=dict(b2n="vit_b16_c2_ep5_batch4_2ctx", xd="vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
                                fewshot="vit_b16_c2_ep5_batch4_2ctx_few_shot"))
class MaPLe(CoOp):
    """Multi-modal prompt learning: deep text prompts coupled into deep vision prompts; CLIP stays frozen.

    CoOp's contract (``forward_parts``, ``extra_loss`` = 0, ``loss``, cached-text ``inference``) is inherited: only the
    model differs, and its image features now depend on the prompts.
    """

    config_node = "MAPLE"

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        m = cfg.TRAINER.MAPLE
        if m.N_CTX < 1:
            raise ValueError(f"TRAINER.MAPLE.N_CTX must be >= 1, got {m.N_CTX}")
        if m.PROMPT_DEPTH < 0 or (m.PROMPT_DEPTH == 0 and not self.eval_only):
            raise ValueError(f"TRAINER.MAPLE.PROMPT_DEPTH must be >= 1 for training (0: no prompts, eval-only), "
                             f"got {m.PROMPT_DEPTH}")

    def build_model(self) -> None:
        m = self.cfg.TRAINER.MAPLE
        clip = self.build_clip()
        depth, blocks = int(m.PROMPT_DEPTH), min(clip.n_layers_text, clip.n_layers_image)
        if depth > blocks:
            raise ValueError(f"TRAINER.MAPLE.PROMPT_DEPTH {depth} exceeds the {blocks} blocks of "
                             f"{self.cfg.MODEL.BACKBONE.NAME}; choose 1..{blocks} (9 for ViT-B/16)")
        prompt_learner = MaPLePromptLearner(clip, self.classnames, int(m.N_CTX), m.CTX_INIT, depth)
        self.model = MaPLeModel(clip, prompt_learner)
        self.register_model("prompt_learner", prompt_learner)
        self._text: torch.Tensor | None = None


register_dept("MaPLe", trainable_params=8576 + 906, presets=dict(b2n="vit_b16_c2_ep10_batch4_2ctx"))
