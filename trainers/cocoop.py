"""CoCoOp: Zhou, Yang, Loy, Liu, *Conditional Prompt Learning for Vision-Language Models*, CVPR 2022
(https://arxiv.org/abs/2203.05557). Reference: KaiyangZhou/CoOp ``trainers/cocoop.py``.

Trainable: the generic context ``ctx`` (M × D) and the Meta-Net ``Linear(E → E/16) → ReLU → Linear(→ D)``, both in
``prompt_learner`` (ViT-B/16, M = 4: 2,048 + 33,312 = 35,360 parameters).
Each image shifts every context token by ``π_i = MetaNet(f_i)`` (f_i the normalised image feature), so the C class
prompts ``[SOS][ctx + π_i][name_c][.][EOS]`` differ per image and ``logits[i, c] = τ · f_i · norm(E_t(P_c(x_i)))``;
L = CE(logits, y). Both encoders are frozen.

Departures from upstream: the B × C (image, class) prompts of a batch go through the text encoder together, in
chunks of ``TEXT_BATCH_SIZE`` prompts (upstream loops over the images of the batch, which is why its configs use
batch size 1); nothing is cached across test batches, because the text features depend on the image (SkipTuning's
``model_inference`` returns the first test batch's logits for every later batch); ``CTX_INIT`` counts BPE tokens,
not words; the Meta-Net keeps float master weights under fp16 (the engine's autocast runs it in half; upstream
casts it to half and trains it without master weights); checkpoints hold ``ctx`` and ``meta_net.*`` only, under
upstream's key names, so upstream checkpoints load (their prompt buffers are ignored).
Class-specific context (CoOp's CSC) has no meaning here, the per-image shift being shared by all classes: the node
has no CSC key, so setting ``TRAINER.COCOOP.CSC`` fails as an unknown key. Only the ``end`` class-token position
exists, as upstream.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from vltune.registry import TRAINERS
from vltune.tuners.prompting import PromptLearner, PromptTrainer, SimParts


def add_config(cfg: CN) -> None:
    """``TRAINER.COCOOP`` (upstream's node: N_CTX, CTX_INIT, PREC; plus vltune's TEXT_BATCH_SIZE)."""
    cfg.TRAINER.COCOOP = CN()
    cfg.TRAINER.COCOOP.N_CTX = 16  # number of context vectors M (ignored when CTX_INIT is set)
    cfg.TRAINER.COCOOP.CTX_INIT = ""  # initialisation phrase, e.g. "a photo of a" (M = its BPE token count)
    cfg.TRAINER.COCOOP.PREC = ""  # fp16 (CUDA) | amp | fp32; empty: TRAINER.PREC (default fp16, as upstream)
    # [vltune] prompts per text-encoder call: a batch's B × C (image, class) prompts are encoded in chunks of this
    # many (0: all in one call). Bounds the memory of large test batches × many classes; results do not depend on it.
    cfg.TRAINER.COCOOP.TEXT_BATCH_SIZE = 4096


class ConditionalPromptLearner(PromptLearner):
    """CoOp's generic ``end`` prompt (prefix/suffix buffers, ctx init) plus the Meta-Net that shifts ctx per image.

    ``PromptLearner.forward()`` is inherited unchanged and gives the unshifted (CoOp) prompts.
    """

    def __init__(self, clip: nn.Module, classnames: list[str], n_ctx: int, ctx_init: str) -> None:
        super().__init__(clip, classnames, n_ctx, ctx_init, csc=False, position="end")
        vis_dim = clip.embed_dim
        hidden = max(1, vis_dim // 16)
        # Upstream's module names, so upstream checkpoints (meta_net.linear1.weight, …) load as they are.
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)),
            ("relu", nn.ReLU()),
            ("linear2", nn.Linear(hidden, clip.width_text)),
        ]))

    @property
    def n_cls(self) -> int:
        return self.token_prefix.shape[0]

    def shifted_context(self, image: torch.Tensor) -> torch.Tensor:
        """``ctx + π(f)``: every context token shifted by the same per-image bias.

        Input: (B, E) normalised image features. Output: (B, M, D).
        """
        weight = self.meta_net.linear1.weight  # image features may come from half weights (fp16 mode)
        bias = self.meta_net(image.to(weight.dtype))
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def pair_prompts(self, ctx: torch.Tensor, image_idx: torch.Tensor,
                     class_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings of (image, class) pairs, ``[SOS][ctx_i][name_c][.][EOS]``.

        Input: ``ctx`` (B, M, D) from ``shifted_context``; ``image_idx``, ``class_idx`` (N,).
        Output: (N, L, D) embeddings without positional embedding, (N,) EOT indices.
        """
        prefix, suffix = self.token_prefix[class_idx], self.token_suffix[class_idx]
        return torch.cat([prefix, ctx[image_idx], suffix], dim=1), self.eot[class_idx]


class CoCoOpModel(nn.Module):
    """Frozen CLIP + conditional prompt learner: image features, and per-image class text features from them."""

    def __init__(self, clip: nn.Module, prompt_learner: ConditionalPromptLearner, text_batch_size: int = 0) -> None:
        super().__init__()
        self.clip, self.prompt_learner = clip, prompt_learner
        self.text_batch_size = text_batch_size

    def image_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features (B, E), normalised unless ``normalize`` is False (the encoder output)."""
        with torch.no_grad():  # nothing on the image path is trainable (the Meta-Net reads f, it does not train E_v)
            return self.clip.encode_image(images, normalize=normalize)

    def text_features(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text features of every (image, class) prompt, normalised unless ``normalize`` is False (the encoder
        output). Input: (B, E) normalised image features (the Meta-Net's input). Output: (B, C, E).

        The B × C prompts are flattened and encoded together (chunks of ``text_batch_size``; one call when it is 0
        or at least B × C), never one image at a time. Each chunk's prompts are built just before it is encoded, so
        at inference (no autograd graph) memory follows the chunk, not B × C.
        """
        learner = self.prompt_learner
        ctx = learner.shifted_context(image)
        n_img, n_cls = ctx.shape[0], learner.n_cls
        pairs = torch.arange(n_img * n_cls, device=ctx.device)
        chunk = self.text_batch_size if self.text_batch_size > 0 else len(pairs)
        features = []
        for rows in pairs.split(chunk):
            prompts, eot = learner.pair_prompts(ctx, rows // n_cls, rows % n_cls)
            features.append(self.clip.encode_text_from_embeddings(prompts, eot))
        features = torch.cat(features)
        return (F.normalize(features, dim=-1) if normalize else features).view(n_img, n_cls, -1)


@TRAINERS.register("CoCoOp", add_config=add_config, family="prompt",
                   test_overrides=dict(trainable_params=1604, text_per_image=True),
                   presets=dict(b2n="vit_b16_c4_ep10_batch1_ctxv1", xd="vit_b16_c4_ep10_batch1_ctxv1",
                                fewshot="vit_b16_c4_ep10_batch1_ctxv1"))
class CoCoOp(PromptTrainer):
    """Conditional context optimisation: CoOp's context plus a per-image shift from a small Meta-Net."""

    config_node = "COCOOP"

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        c = cfg.TRAINER.COCOOP
        if not c.CTX_INIT and c.N_CTX < 1:
            raise ValueError(f"TRAINER.COCOOP.N_CTX must be >= 1, got {c.N_CTX}")
        if c.TEXT_BATCH_SIZE < 0:
            raise ValueError(f"TRAINER.COCOOP.TEXT_BATCH_SIZE must be >= 0 (0: one call), got {c.TEXT_BATCH_SIZE}")

    def build_model(self) -> None:
        c = self.cfg.TRAINER.COCOOP
        clip = self.build_clip()
        prompt_learner = ConditionalPromptLearner(clip, self.classnames, c.N_CTX, c.CTX_INIT)
        self.model = CoCoOpModel(clip, prompt_learner, c.TEXT_BATCH_SIZE)
        self.register_model("prompt_learner", prompt_learner)

    def forward_parts(self, images: torch.Tensor, text: torch.Tensor | None = None, raw: bool = False) -> SimParts:
        """Image features (B, E), per-image class text features (B, C, E) (``text`` if given) and logits (B, C);
        with ``raw``, also the encoder outputs before normalisation (B, E) and (B, C, E) (``SimParts``)."""
        if not raw:
            image = self.model.image_features(images)
            text = self.model.text_features(image) if text is None else text
            return self.make_parts(image, text)
        raw_image = self.model.image_features(images, normalize=False)
        image = F.normalize(raw_image, dim=-1)
        raw_text = self.model.text_features(image, normalize=False) if text is None else None
        text = F.normalize(raw_text, dim=-1) if text is None else text
        return self.make_parts(image, text, raw_image, raw_text)

    def eval_text_features(self) -> None:
        """None: the text features depend on each image, so every test batch is encoded afresh."""
        return None
