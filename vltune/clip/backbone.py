"""The one CLIP every vltune method uses: open_clip's ``CLIP`` split into embed / blocks / head, with per-block hooks.

Methods never fork CLIP (methods.md §0.3 rule 1). Deep prompts (MaPLe, PromptSRC, TCP, VPT) replace or append tokens
in ``BlockHooks.before_block``; adapters and bypass tuners read or change block outputs in ``after_block``; layer
caching (Skip Tuning) runs ``image_blocks`` over a range and resumes later from the cached tokens.

Layout: open_clip 3.x transformers are batch-first, so every token tensor here is (N, L, D), not OpenAI CLIP's
(L, N, D). Text is pooled at the EOT token (the argmax of the token ids), and text sequences are cut to
``max(eot) + 1`` before the blocks: with the causal mask the features are identical and short prompts run about 3x
faster (methods.md §0.3 rule 4). ``truncate_text = False`` (``MODEL.BACKBONE.TRUNCATE_TEXT``) runs every context
position instead, as the public reference code does: a switch for measuring that cost, not for accuracy.

The pieces are open_clip's own modules and methods (``visual._embeds``, ``visual._pool``, the residual blocks);
only the block loop is ours, so the wrapper reproduces ``CLIP.encode_image`` / ``CLIP.encode_text`` numerically.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import Transformer, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class BlockHooks:
    """Hook points around every residual block of both towers; override either method (the defaults are identity).

    ``tower`` is ``"text"`` or ``"image"``, ``i`` the absolute block index (0-based) and ``x`` the (N, L, D) tokens.
    A before-hook may change L (VPT appends prompt tokens); the text causal mask follows the new length. For the text
    tower, tokens after the EOT position never influence the EOT feature, so hooks must keep prompt tokens before it.
    A plain mixin: a hook object that owns parameters can also inherit ``nn.Module``.
    """

    def before_block(self, tower: str, i: int, x: Tensor) -> Tensor:
        """Called with the input of block ``i``; returns the (N, L', D) tokens the block runs on."""
        return x

    def after_block(self, tower: str, i: int, x: Tensor) -> Tensor:
        """Called with the output of block ``i``; returns the (N, L', D) tokens passed on."""
        return x

    #: set True in a subclass that defines branches: the block then runs piecewise (ln → attention → residual →
    #: ln → MLP → residual) so a branch can be added parallel to each frozen operation (Res-Tuning's unbinding)
    branches = False

    def attn_branch(self, tower: str, i: int, h: Tensor) -> Tensor | None:
        """With ``branches``: added to block ``i``'s attention output; ``h`` = ``ln_1(x)``, the attention's input."""
        return None

    def mlp_branch(self, tower: str, i: int, h: Tensor) -> Tensor | None:
        """With ``branches``: added to block ``i``'s MLP output; ``h`` = ``ln_2(x)``, the MLP's input."""
        return None


@functools.lru_cache(maxsize=8)
def _tokenizer(arch: str, context_length: int) -> Callable[..., Tensor]:
    # Loading the BPE vocabulary takes ~0.2 s; share one tokenizer per architecture.
    return open_clip.get_tokenizer(arch, context_length=context_length)


class CLIPBackbone(nn.Module):
    """An open_clip ``CLIP`` (held as ``self.model``) with per-block access to both towers.

    The wrapper freezes nothing and owns no parameters of its own; parameter names are the open_clip ones under
    ``model.`` (``model.visual.transformer.resblocks.0.attn.in_proj_weight``). ResNet image towers support only
    ``encode_image`` without hooks; the per-block image methods need a ViT.

    Args:
        model: an open_clip ``CLIP`` (see ``vltune.clip.load_clip``).
        arch: the open_clip architecture name, used to pick the tokenizer (empty: open_clip's default CLIP BPE).
    """

    truncate_text: bool = True  # cut text to the last EOT (see the module docstring)

    def __init__(self, model: CLIP, arch: str = "") -> None:
        super().__init__()
        if not isinstance(model, CLIP):
            raise TypeError(f"CLIPBackbone wraps an open_clip CLIP, got {type(model).__name__}")
        if model.text_pool_type not in ("argmax", "eos"):
            raise NotImplementedError(
                f"text pooling {model.text_pool_type!r} is not supported; vltune pools text at the EOT token "
                "(open_clip text pool_type 'argmax' or 'eos')"
            )
        towers = [model.transformer] + (
            [model.visual.transformer] if isinstance(model.visual, VisionTransformer) else []
        )
        if not all(isinstance(t, Transformer) and t.batch_first for t in towers):
            raise NotImplementedError("CLIPBackbone expects open_clip's batch-first Transformer in both towers")
        if isinstance(model.visual, VisionTransformer) and not all(
            hasattr(model.visual, a) for a in ("_embeds", "_pool")
        ):
            raise NotImplementedError(
                "this open_clip lacks VisionTransformer._embeds/_pool (written for open_clip 3.3)"
            )
        self.model = model
        self.arch = arch
        self._masks: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ properties
    @property
    def is_vit(self) -> bool:
        """Whether the image tower is a ViT (per-block image access); False for ResNet/timm towers."""
        return isinstance(self.model.visual, VisionTransformer)

    @property
    def n_layers_text(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def n_layers_image(self) -> int:
        return len(self._vit("n_layers_image").transformer.resblocks)

    @property
    def width_text(self) -> int:
        return self.model.transformer.width

    @property
    def width_image(self) -> int:
        return self._vit("width_image").transformer.width

    @property
    def embed_dim(self) -> int:
        """E, the joint image-text embedding size."""
        proj = self.model.text_projection
        if proj is None:
            return self.width_text
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def image_size(self) -> int:
        """The input resolution (square), e.g. 224 for ViT-B/16."""
        size = self.model.visual.image_size
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise ValueError(f"non-square image size {size} is not supported")
        return int(height)

    @property
    def logit_scale(self) -> Tensor:
        """τ = exp(logit_scale) as a detached 0-d (or 1-element) tensor; about 100 for OpenAI weights."""
        return self.model.logit_scale.detach().exp()

    def similarity(self, image: Tensor, text: Tensor) -> Tensor:
        """CLIP's logits τ · f · Tᵀ: every method's class scores from (normalised) features.

        Input: image (B, E) and class text (K, E), or per-image class text (B, K, E) (CoCoOp's conditional prompts);
        text is cast to the image's dtype. Output: (B, K).
        """
        text = text.to(image.dtype)
        if text.dim() == 3:
            return self.logit_scale * torch.einsum("be,bke->bk", image, text)
        return self.logit_scale * image @ text.t()

    def text_positions(self, start: int, n: int) -> Tensor:
        """The text positional embedding of positions ``start`` .. ``start + n − 1``: (n, D_t). MaPLe adds it to the
        block-0 prompt tokens it writes over the hand-written phrase."""
        return self.model.positional_embedding[start:start + n]

    def blocks(self, tower: str) -> nn.ModuleList:
        """The residual blocks of ``tower`` ("text" or "image"), for methods that attach modules per block
        (Res-Tuning's tuners borrow each block's frozen attention and ``ln_1``)."""
        return (self.model.transformer if tower == "text" else self._vit("blocks").transformer).resblocks

    @property
    def pools_cls_token(self) -> bool:
        """Whether the image head reads the CLS token alone (OpenAI ViTs), not a pooling over all tokens."""
        visual = self._vit("pools_cls_token")
        return visual.pool_type == "tok" and visual.attn_pool is None

    @property
    def ln_pre(self) -> nn.Module:
        """The image tower's LayerNorm after the patch embedding (the block-0 input's last step): VPT-style methods
        (MaPLe, PromptSRC, CoPrompt) pass their first-layer vision prompts through it, as their CLIP forks do."""
        return self._vit("ln_pre").ln_pre

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the block weights (fp16 in upstream's PREC=fp16 mode); inputs are cast to it."""
        return self.model.transformer.get_cast_dtype()

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def tokenizer(self) -> Callable[..., Tensor]:
        """open_clip's tokenizer for this architecture (SOT 49406 + BPE + EOT 49407, zero padded, truncated)."""
        return _tokenizer(self.arch, self.context_length)

    # ------------------------------------------------------------------ text tower
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids on the model's device. Output: (N, context_length) int64.

        Texts longer than the context are truncated with EOT kept last (OpenAI's ``clip.tokenize`` raises instead).
        """
        return self.tokenizer(list(texts)).to(self.device)

    def token_embedding(self, ids: Tensor) -> Tensor:
        """Token embeddings without positions, in ``dtype``. Input: (N, L) ids. Output: (N, L, D_t)."""
        return self.model.token_embedding(ids.to(self.device)).to(self.dtype)

    def eot_index(self, ids: Tensor) -> Tensor:
        """Position of the EOT token, where the text feature is pooled. Input: (N, L) ids. Output: (N,) int64."""
        if self.model.text_pool_type == "argmax":  # EOT has the largest id of the vocabulary
            return ids.argmax(dim=-1)
        return (ids == self.model.text_eos_id).int().argmax(dim=-1)

    def _text_length(self, eot_idx: Tensor, length: int, truncate: bool) -> int:
        # Only the causal mask makes positions after the EOT irrelevant.
        if not (truncate and self.truncate_text) or self.model.attn_mask is None:
            return length
        return min(length, int(eot_idx.max()) + 1)

    def cut_text(self, x: Tensor, eot_idx: Tensor) -> Tensor:
        """The leading positions of token ids or embeddings (N, L[, D]) that text encoding needs: up to the last
        EOT in ``eot_idx`` (identical features under the causal mask), or all L when ``truncate_text`` is off."""
        return x[:, : self._text_length(eot_idx, x.shape[1], True)]

    def _add_text_positions(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        if length > self.model.positional_embedding.shape[0]:
            raise ValueError(f"text sequence of {length} tokens exceeds the context length {self.context_length}")
        return x.to(self.dtype) + self.model.positional_embedding[:length].to(self.dtype)

    def embed_text(self, ids: Tensor) -> Tensor:
        """Token plus positional embedding. Input: (N, L) ids, L <= context_length. Output: (N, L, D_t)."""
        return self._add_text_positions(self.token_embedding(ids))

    def _causal_mask(self, x: Tensor) -> Tensor | None:
        # open_clip's format: an additive float (L, L) mask, -inf above the diagonal, passed to every block as
        # ``attn_mask``. Built for the current length (hooks may change it), cached per (length, device, dtype).
        if self.model.attn_mask is None:
            return None
        length = x.shape[1]
        key = (length, x.device, x.dtype)
        if key not in self._masks:
            self._masks[key] = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        return self._masks[key]

    def _run_blocks(
        self, tower: str, transformer: Transformer, x: Tensor, start: int, end: int, hooks: BlockHooks | None
    ) -> Tensor:
        n = len(transformer.resblocks)
        if not 0 <= start <= end <= n:
            raise ValueError(f"{tower} block range [{start}, {end}) is outside [0, {n}]")
        for i in range(start, end):
            if hooks is not None:
                x = hooks.before_block(tower, i, x)
            mask = self._causal_mask(x) if tower == "text" else None
            block = transformer.resblocks[i]
            if hooks is not None and hooks.branches:
                x = self._branched_block(block, x, mask, tower, i, hooks)
            elif transformer.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(functools.partial(block, attn_mask=mask), x, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
            if hooks is not None:
                x = hooks.after_block(tower, i, x)
        return x

    @staticmethod
    def _branched_block(block: nn.Module, x: Tensor, mask: Tensor | None, tower: str, i: int,
                        hooks: BlockHooks) -> Tensor:
        # open_clip's ResidualAttentionBlock.forward for self-attention, with the hooks' parallel branches added
        h = block.ln_1(x)
        out = block.attention(q_x=h, attn_mask=mask)
        branch = hooks.attn_branch(tower, i, h)
        x = x + block.ls_1(out if branch is None else out + branch)
        h = block.ln_2(x)
        out = block.mlp(h)
        branch = hooks.mlp_branch(tower, i, h)
        return x + block.ls_2(out if branch is None else out + branch)

    def text_blocks(self, x: Tensor, start: int, end: int, hooks: BlockHooks | None = None) -> Tensor:
        """Run text blocks ``start`` .. ``end - 1`` under the causal mask. Input/Output: (N, L, D_t)."""
        return self._run_blocks("text", self.model.transformer, x, start, end, hooks)

    def text_head(self, x: Tensor, eot_idx: Tensor) -> Tensor:
        """``ln_final`` at the EOT position, then the text projection. Input: (N, L, D_t), (N,). Output: (N, E)."""
        x = x[torch.arange(x.shape[0], device=x.device), eot_idx.to(x.device)]
        x = self.model.ln_final(x)  # per token, so pooling first equals open_clip's LN-then-pool
        proj = self.model.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(
        self,
        ids: Tensor,
        normalize: bool = False,
        hooks: BlockHooks | None = None,
        batch_size: int | None = None,
        truncate: bool = True,
    ) -> Tensor:
        """Text features of token ids. Input: (N, L) ids. Output: (N, E).

        Args:
            ids: token ids from ``tokenize``.
            normalize: L2-normalise the features.
            hooks: per-block hooks.
            batch_size: encode in chunks of this many texts (large class sets); None encodes all at once.
            truncate: cut each chunk to its longest prompt (identical features); False runs all L positions.
        """
        ids = ids.to(self.device)
        if batch_size and ids.shape[0] > batch_size:
            return torch.cat([self.encode_text(c, normalize, hooks, None, truncate) for c in ids.split(batch_size)])
        eot = self.eot_index(ids)
        ids = ids[:, : self._text_length(eot, ids.shape[1], truncate)]
        x = self.text_head(self.text_blocks(self.embed_text(ids), 0, self.n_layers_text, hooks), eot)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_from_embeddings(
        self,
        prompt_embeds: Tensor,
        eot_idx: Tensor,
        hooks: BlockHooks | None = None,
        normalize: bool = False,
        truncate: bool = True,
    ) -> Tensor:
        """Text features of token embeddings (CoOp's prompts: [SOT][ctx][class tokens][EOT]...).

        Args:
            prompt_embeds: (N, L, D_t) token embeddings WITHOUT the positional embedding.
            eot_idx: (N,) EOT positions in those sequences (``eot_index`` of the matching ids).
            hooks: per-block hooks.
            normalize: L2-normalise the features.
            truncate: cut to ``max(eot_idx) + 1`` positions first (identical features).

        Returns:
            (N, E) features.
        """
        eot_idx = eot_idx.to(prompt_embeds.device)
        x = prompt_embeds[:, : self._text_length(eot_idx, prompt_embeds.shape[1], truncate)]
        x = self.text_head(self.text_blocks(self._add_text_positions(x), 0, self.n_layers_text, hooks), eot_idx)
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ image tower
    def _vit(self, what: str) -> VisionTransformer:
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(
                f"{what} needs a ViT image tower, but {self.arch or 'this model'} has a {type(visual).__name__}; "
                "ResNet towers support only encode_image(images) without hooks"
            )
        return visual

    def embed_image(self, images: Tensor) -> Tensor:
        """Patch embedding + class token + positional embedding (+ patch dropout in training) + ``ln_pre``.

        Input: (N, 3, H, W) normalised images, cast to ``dtype``. Output: (N, 1 + P, D_v), CLS first.
        """
        return self._vit("embed_image")._embeds(images.to(self.device, self.dtype))

    def image_blocks(self, x: Tensor, start: int, end: int, hooks: BlockHooks | None = None) -> Tensor:
        """Run image blocks ``start`` .. ``end - 1``. Input/Output: (N, L, D_v), L = 1 + P (+ prompt tokens)."""
        return self._run_blocks("image", self._vit("image_blocks").transformer, x, start, end, hooks)

    def image_head(self, x: Tensor) -> Tensor:
        """open_clip's pooling (``ln_post`` on the CLS token for OpenAI models), then ``proj``.

        Input: (N, L, D_v) output tokens of the last block. Output: (N, E).
        """
        visual = self._vit("image_head")
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    def encode_image(self, images: Tensor, hooks: BlockHooks | None = None, normalize: bool = False) -> Tensor:
        """Image features. Input: (N, 3, H, W) normalised images. Output: (N, E)."""
        if self.is_vit:
            x = self.image_head(self.image_blocks(self.embed_image(images), 0, self.n_layers_image, hooks))
        elif hooks is not None:
            raise NotImplementedError(f"block hooks need a ViT image tower, not a {type(self.model.visual).__name__}")
        else:
            x = self.model.encode_image(images.to(self.device, self.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ zero-shot
    @torch.no_grad()
    def zero_shot_classifier(
        self, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
    ) -> Tensor:
        """Normalised zero-shot text weights, one row per class; compute once per class set (§0.3 rule 3).

        ``_`` in class names becomes a space here (the split files keep raw names). With one template a row is the
        normalised feature of its prompt; with several, the renormalised mean of the normalised features (CLIP's
        prompt ensembling). Prompts are encoded in batches of about ``batch_size`` texts, never one class at a time.

        Returns:
            (C, E) in ``dtype``.
        """
        if not classnames or not templates:
            raise ValueError("zero_shot_classifier needs at least one class name and one template")
        classes_per_batch = max(1, batch_size // len(templates))
        rows = []
        for start in range(0, len(classnames), classes_per_batch):
            names = [c.replace("_", " ") for c in classnames[start : start + classes_per_batch]]
            prompts = [t.format(name) for name in names for t in templates]
            feats = self.encode_text(self.tokenize(prompts), normalize=True, batch_size=batch_size).float()
            feats = feats.view(len(names), len(templates), -1)
            rows.append(feats[:, 0] if len(templates) == 1 else F.normalize(feats.mean(dim=1), dim=-1))
        return torch.cat(rows).to(self.dtype)
