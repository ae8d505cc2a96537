"""Deep prompts: fresh prompt tokens entering the blocks of either CLIP tower (MaPLe, PromptSRC, CoPrompt), and
MaPLe's coupled learner (``CoupledPrompts``, which CoPrompt reuses).

The three methods' CLIP forks differ in where each layer's tokens come from (coupled projections, independent
tensors), never in how the tokens enter a block. ``DeepPrompts`` is that one mechanism, as block hooks on the shared
backbone; each method builds it from its own learner every forward, so the prompts stay differentiable.

::

    text tower, before block i with prompts p_i (M, D_t):   tokens 1..M ← p_i     (the SOS token stays first)
    image tower, before block 0 with prompts p_0 (M, D_v):  tokens ← [tokens, ln_pre(p_0)]   (appended, VPT-deep)
    image tower, before block i > 0 with prompts p_i:       the last M tokens ← p_i
    blocks without prompts carry whatever tokens arrive

The first vision prompts pass through ``ln_pre``: the forks append them before the LayerNorm that ends the patch
embedding, and vltune's block-0 input is after it (LayerNorm is per token, so the tokens are the same).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from vltune.clip.backbone import BlockHooks
from vltune.tuners.prompting import PromptModel


class DeepPrompts(BlockHooks):
    """Prompt tokens per block for either tower.

    Args:
        text: per text block i, its prompts (M, D_t) or None to leave block i alone; later blocks are untouched.
        vision: per image block i, its prompts (M, D_v) or None; block 0's are appended, later blocks' replace the last
            M tokens.
        ln_pre: the image tower's ``ln_pre`` (``CLIPBackbone.ln_pre``), applied to block 0's vision prompts; needed
            when ``vision[0]`` is given.
    """

    def __init__(self, text: Sequence[torch.Tensor | None] = (), vision: Sequence[torch.Tensor | None] = (),
                 ln_pre: nn.Module | None = None) -> None:
        if len(vision) and vision[0] is not None and ln_pre is None:
            raise ValueError("DeepPrompts: block-0 vision prompts need the image tower's ln_pre")
        self.text, self.vision, self.ln_pre = list(text), list(vision), ln_pre

    def before_block(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        prompts = self.text if tower == "text" else self.vision
        if i >= len(prompts) or prompts[i] is None:
            return x
        p = prompts[i].to(x.dtype)
        n = p.shape[0]
        if tower == "text":
            return torch.cat([x[:, :1], p.expand(x.shape[0], -1, -1), x[:, 1 + n:]], dim=1)
        if i == 0:
            return torch.cat([x, self.ln_pre(p).to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return torch.cat([x[:, :-n], p.expand(x.shape[0], -1, -1)], dim=1)


class CoupledPrompts(nn.Module):
    """MaPLe's multi-modal prompts (also CoPrompt's): the text context P_0 (M × D_t) and deep text prompts P_i, each
    coupled into the image tower by its own Linear F_i (D_t → D_v); blocks 0..J−1 of both towers get prompts.

    ``forward()``: the class prompts ``[SOS][P_0][rest of "{phrase} {name}."]`` (C, L, D_t) without positions, and
    their EOT indices (C,); ``text_hooks()`` put P_1..P_{J−1} into text blocks 1..J−1 and ``image_hooks(clip)``
    F_0(P_0)..F_{J−1}(P_{J−1}) into image blocks 0..J−1. Checkpoint keys as upstream: ``ctx``, ``proj``,
    ``compound_prompts_text.{i-1}``, ``compound_prompt_projections.{i-1}``.

    Init as upstream: P_0 = the first M token embeddings of ``ctx_init`` (else N(0, 0.02²), prompt "X X … name."),
    then F_0, then P_1..P_{J−1} ~ N(0, 0.02²), then one further Linear that every F_i (i ≥ 1) copies: they start equal
    to each other, not to F_0 (drawn even at J = 1, so later draws stay aligned).

    Args:
        clip: the backbone (tokenizer, token embeddings, widths).
        classnames: raw class names (``_`` becomes a space here).
        n_ctx: M.
        ctx_init: initialisation phrase (at least M tokens); "" for random init.
        depth: J. At 0 nothing enters a block: P_0 is then the phrase's frozen tokens, or trainable with ``shallow``.
        shallow: keep P_0 trainable at depth 0 (CoPrompt's shallow context).
        where: the config key of ``ctx_init`` for error messages.
    """

    def __init__(self, clip: nn.Module, classnames: list[str], n_ctx: int, ctx_init: str, depth: int,
                 shallow: bool = False, where: str = "CTX_INIT") -> None:
        super().__init__()
        names = [c.replace("_", " ") for c in classnames]
        d_text, d_image = clip.width_text, clip.width_image if depth else 0
        with torch.no_grad():
            if ctx_init:
                phrase = ctx_init.replace("_", " ")
                ids = clip.tokenize([phrase])
                if int(clip.eot_index(ids)[0]) - 1 < n_ctx:
                    raise ValueError(f"{where} {ctx_init!r} has fewer than N_CTX={n_ctx} tokens: lower N_CTX or use "
                                     "a longer phrase ('' = random init)")
                ctx = clip.token_embedding(ids)[0, 1:1 + n_ctx].float().clone()
            else:
                phrase = " ".join(["X"] * n_ctx)
                ctx = torch.empty(n_ctx, d_text).normal_(std=0.02)
            ids = clip.tokenize([f"{phrase} {name}." for name in names])
            eot = clip.eot_index(ids)
            embedding = clip.token_embedding(clip.cut_text(ids, eot)).clone()
        self.n_ctx, self.depth = n_ctx, depth
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:], persistent=False)  # rest of the prompt
        self.register_buffer("eot", eot, persistent=False)
        if depth == 0 and not shallow:  # the hand-written prompt itself, frozen (and not saved)
            self.register_buffer("ctx", embedding[0, 1:1 + n_ctx].clone(), persistent=False)
        else:
            self.ctx = nn.Parameter(ctx)
        deep = max(depth - 1, 0)
        self.proj = nn.Linear(d_text, d_image) if depth else None
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, d_text).normal_(std=0.02)) for _ in range(deep)])
        single = nn.Linear(d_text, d_image) if depth else None
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(deep)])

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1), self.eot

    def text_hooks(self) -> DeepPrompts | None:
        """P_1..P_{J−1} before text blocks 1..J−1 (P_0 is in the embeddings); None below depth 2."""
        return DeepPrompts(text=[None, *self.compound_prompts_text]) if len(self.compound_prompts_text) else None

    def text_prompts(self) -> list[torch.Tensor]:
        """[P_0, …, P_{J−1}], each (M, D_t); empty at depth 0."""
        return [self.ctx, *self.compound_prompts_text] if self.depth else []

    def vision_prompts(self) -> list[torch.Tensor]:
        """[F_0(P_0), …, F_{J−1}(P_{J−1})], each (M, D_v): the coupling of each layer's text prompt."""
        projections = [self.proj, *self.compound_prompt_projections] if self.depth else []
        return [f(p) for f, p in zip(projections, self.text_prompts())]

    def image_hooks(self, clip: nn.Module) -> DeepPrompts | None:
        """F_i(P_i) before image blocks 0..J−1; None at depth 0 (the image tower is untouched)."""
        vision = self.vision_prompts()
        return DeepPrompts(vision=vision, ln_pre=clip.ln_pre) if vision else None


class DeepPromptModel(PromptModel):
    """Frozen CLIP + a learner with ``text_hooks()`` and ``image_hooks(clip)`` (``CoupledPrompts``, PromptSRC's)."""

    def text_hooks(self) -> BlockHooks | None:
        return self.prompt_learner.text_hooks()

    def image_hooks(self) -> BlockHooks | None:
        return self.prompt_learner.image_hooks(self.clip)
