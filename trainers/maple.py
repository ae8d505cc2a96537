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

The learner and the hooks are vltune's shared ``CoupledPrompts`` / ``DeepPrompts`` (``vltune/tuners/deep_prompts.py``),
which CoPrompt reuses.

Departures from upstream (methods.md §6): no forked CLIP; P_0 sits in the prompt embeddings in place of the init
phrase's first M tokens, so block 0 receives P_0 plus the positional embedding (the same sum upstream's block-0
replacement builds), deeper prompts enter as block hooks, and the vision prompts are appended after ``ln_pre`` as
``ln_pre(F_0(P_0))`` (LayerNorm is per token, so this equals upstream's append-then-norm).
Prompts follow the backbone dtype (no hard-coded ``.half()``); checkpoints hold the trainable tensors only (upstream
saves the whole CustomCLIP); text features are computed once per evaluation. A ``CTX_INIT`` with fewer than M tokens
is an error (upstream silently switches to random init when M > 4).
"""

from __future__ import annotations

from yacs.config import CfgNode as CN

from trainers.dept import register_dept
from vltune.registry import TRAINERS
from vltune.tuners.deep_prompts import CoupledPrompts, DeepPromptModel
from vltune.tuners.prompting import PromptTrainer


def add_config(cfg: CN) -> None:
    """``TRAINER.MAPLE`` (upstream's keys and defaults)."""
    cfg.TRAINER.MAPLE = CN()
    cfg.TRAINER.MAPLE.N_CTX = 2  # M, prompt tokens per layer and tower
    cfg.TRAINER.MAPLE.CTX_INIT = "a photo of a"  # P_0 = its first M token embeddings; "" = random "X X ..." prompt
    cfg.TRAINER.MAPLE.PREC = ""  # fp16 (CUDA) | amp | fp32; empty: TRAINER.PREC (default fp16, as upstream)
    cfg.TRAINER.MAPLE.PROMPT_DEPTH = 9  # J: blocks 0..J-1 of both towers get prompts (1..n_layers; 0 = none, eval)


@TRAINERS.register("MaPLe", add_config=add_config, family="prompt",
                   test_overrides=dict(trainable_params=8576,  # M = 2, J = 2, widths 64: 2·128 P + 2·4,160 F
                                       opts={"TRAINER.MAPLE.PROMPT_DEPTH": 2}),
                   presets=dict(b2n="vit_b16_c2_ep5_batch4_2ctx", xd="vit_b16_c2_ep5_batch4_2ctx_cross_datasets",
                                fewshot="vit_b16_c2_ep5_batch4_2ctx_few_shot"))
class MaPLe(PromptTrainer):
    """Multi-modal prompt learning: deep text prompts coupled into deep vision prompts; CLIP stays frozen.

    The base's contract (``forward_parts``, CE, cached-text ``inference``) as is: only the model differs, and its
    image features depend on the prompts (the image path trains).
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
        prompt_learner = CoupledPrompts(clip, self.classnames, int(m.N_CTX), m.CTX_INIT, depth,
                                        where="TRAINER.MAPLE.CTX_INIT")
        self.model = DeepPromptModel(clip, prompt_learner)
        self.register_model("prompt_learner", prompt_learner)


register_dept("MaPLe", trainable_params=8576 + 906, presets=dict(b2n="vit_b16_c2_ep10_batch4_2ctx"))
