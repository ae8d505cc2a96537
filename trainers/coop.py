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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from vltune.engine import TrainerX
from vltune.registry import TRAINERS
from vltune.tuners.skip_plugin import SkipPluginMixin

POSITIONS = ("end", "middle", "front")


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


class PromptLearner(nn.Module):
    """Learnable context around frozen class-name token embeddings.

    Output of ``forward()``: prompt token embeddings (C, L, D) without positional embedding, and EOT indices (C,),
    with L cut to the longest prompt (text truncation gives identical features).
    """

    def __init__(self, clip: nn.Module, classnames: list[str], n_ctx: int, ctx_init: str, csc: bool,
                 position: str) -> None:
        super().__init__()
        names = [c.replace("_", " ") for c in classnames]
        dim = clip.width_text
        with torch.no_grad():
            if ctx_init:
                phrase = ctx_init.replace("_", " ")
                ids = clip.tokenize([phrase])
                n_ctx = int(clip.eot_index(ids)[0]) - 1
                ctx = clip.token_embedding(ids)[0, 1:1 + n_ctx].clone()
                prefix_text = phrase
            else:
                ctx = torch.empty(len(names), n_ctx, dim) if csc else torch.empty(n_ctx, dim)
                nn.init.normal_(ctx, std=0.02)
                prefix_text = " ".join(["X"] * n_ctx)
            ids = clip.tokenize([f"{prefix_text} {name}." for name in names])
            eot = clip.eot_index(ids)
            embedding = clip.token_embedding(clip.cut_text(ids, eot)).clone()
            name_lens = clip.eot_index(clip.tokenize(names)) - 1
        self.ctx = nn.Parameter(ctx)
        self.n_ctx, self.position = n_ctx, position
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:], persistent=False)  # name, ".", EOS, pad
        self.register_buffer("eot", eot, persistent=False)
        self.name_lens = name_lens.tolist()

    def forward(self, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts of all classes, or of ``classes`` (indices, CSkip) only."""
        prefix, suffix, eot, ctx = self.token_prefix, self.token_suffix, self.eot, self.ctx
        name_lens = self.name_lens
        if classes is not None:
            at = classes.to(prefix.device)
            prefix, suffix, eot = prefix[at], suffix[at], eot[at]
            ctx = ctx[at] if ctx.dim() == 3 else ctx
            name_lens = [name_lens[i] for i in classes.tolist()]
        n_cls = prefix.shape[0]
        ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(n_cls, -1, -1)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1), eot
        prompts = []
        half = self.n_ctx // 2
        for i, n in enumerate(name_lens):
            name, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]
            if self.position == "middle":
                parts = [prefix[i:i + 1], ctx[i:i + 1, :half], name, ctx[i:i + 1, half:], rest]
            else:
                parts = [prefix[i:i + 1], name, ctx[i:i + 1], rest]
            prompts.append(torch.cat(parts, dim=1))
        return torch.cat(prompts, dim=0), eot


class CoOpModel(nn.Module):
    """Frozen CLIP + prompt learner. ``forward`` (B, 3, H, W) → logits (B, C)."""

    def __init__(self, clip: nn.Module, prompt_learner: PromptLearner) -> None:
        super().__init__()
        self.clip, self.prompt_learner = clip, prompt_learner

    def text_features(self, classes: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """Class text features (C, E) from the current context (of ``classes`` only, if given); normalised unless
        ``normalize`` is False (the encoder output)."""
        prompts, eot = self.prompt_learner(classes)
        return self.clip.encode_text_from_embeddings(prompts, eot, normalize=normalize)

    def image_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features (B, E); normalised unless ``normalize`` is False (the encoder output)."""
        with torch.no_grad():  # nothing on the image path is trainable
            return self.clip.encode_image(images, normalize=normalize)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        image = self.image_features(images)
        text = self.text_features() if text_features is None else text_features
        return self.clip.logit_scale * image @ text.t().to(image.dtype)


@dataclass
class SimParts:
    """What a prompt learner computes for a batch, for plugins such as DePT that build on it.

    ``image``: normalised image features (B, E); ``text``: normalised class text features, (C, E) or per image
    (B, C, E); ``logits``: the similarity logits τ · f · Tᵀ (B, C).
    ``raw_image``, ``raw_text``: the encoder outputs that ``image`` and ``text`` normalise, filled only when
    ``forward_parts(..., raw=True)`` asks for them (DePT's FiLM and head read them); ``raw_text`` stays None when
    ``text`` was passed in (the evaluation's cached class features).
    """

    image: torch.Tensor
    text: torch.Tensor
    logits: torch.Tensor
    raw_image: torch.Tensor | None = None
    raw_text: torch.Tensor | None = None


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(dim=1) == labels).float().mean() * 100)


class PromptTrainer(SkipPluginMixin, TrainerX):
    """The prompt learners' contract: ``forward_parts`` gives features and logits, ``extra_loss`` a method's
    regulariser, and the loss is their sum with CE. Plugins (DePT) build on these two methods; DePT asks
    ``forward_parts(..., raw=True)`` for the unnormalised encoder outputs too (``raw_image_features``,
    ``raw_class_text_features``, which CoOp's model provides). Class text features from ``eval_text_features`` are
    computed once per evaluation and passed to every test batch.

    **The Skip plugin** (``TRAINER.SKIP_PLUGIN``; methods.md §13, vltune's own: the reference code has none). A
    class whose ``forward_parts`` is ``image_features`` + ``class_text_features`` + τ·cos, and whose ``extra_loss``
    accepts a class subset (``batch["classes"]``), opts in with ``skip_plugin = True`` in its own body (not
    inherited: a subclass that changes features must re-check the contract). Then, in training steps only:

    * ``CSKIP``: the text side computes only the classes Skip Tuning's ``ClassSelector`` keeps for the batch
      (``TRAINER.SKIP`` TOP_RATIO/MAX_TOP/LAMBDA/MASK_POLICY; ranked by the image features against the frozen
      zero-shot features of the dataset template; every label kept); CE runs over the kept classes with remapped
      labels. Evaluation is unchanged (all classes).
    * ``CACHE_IMAGE``: when the image path up to ``image_from_frozen`` has nothing trainable
      (``image_is_frozen()``, e.g. CoOp's image tower, CLIP-Adapter's features before the adapter) and the training
      transform is deterministic, ``frozen_image_features`` runs once per training image before the first epoch and
      steps read the cache: the same training as without it, minus the image tower's cost.
    """

    _text: torch.Tensor | None = None  # the evaluation's cached class text features

    # ---- the contract ----------------------------------------------------------------------------------------
    def forward_parts(self, images: torch.Tensor, text: torch.Tensor | None = None, raw: bool = False) -> SimParts:
        """Image features, class text features (``text`` if given: cached at evaluation) and their logits.

        ``raw``: also keep the encoder outputs before normalisation (``SimParts.raw_image``/``raw_text``), from
        ``raw_image_features`` and ``raw_class_text_features``; the normalised features and logits are the same.
        """
        if raw:
            raw_image = self.raw_image_features(images)
            raw_text = self.raw_class_text_features() if text is None else None
            image = F.normalize(raw_image, dim=-1)
            text = F.normalize(raw_text, dim=-1) if text is None else text
            return self.make_parts(image, text, raw_image, raw_text)
        image = self.image_features(images)
        return self.make_parts(image, self.class_text_features() if text is None else text)

    def raw_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image encoder's output (B, E) before normalisation: ``image_features`` is its normalisation.
        Trainers whose normalised features are something else (an adapter mixed in) have none."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its raw (unnormalised) image features")

    def raw_class_text_features(self) -> torch.Tensor:
        """The text encoder's output (C, E) for all classes before normalisation: ``class_text_features()`` is its
        normalisation."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its raw (unnormalised) text features")

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features (B, E)."""
        return self.image_from_frozen(self.frozen_image_features(images))

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The part of the image path no trainable tensor influences (pixels → features)."""
        raise NotImplementedError

    def image_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        """The rest of the image path, from ``frozen_image_features`` to the normalised features."""
        return frozen

    def image_is_frozen(self) -> bool:
        """Whether ``frozen_image_features`` is defined (the Skip plugin may cache it)."""
        return False

    def class_text_features(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features (K, E) of the training classes ``classes`` (all when None), with grad when
        they train; computing only the given classes is what makes CSkip cheap."""
        raise NotImplementedError

    def make_parts(self, image: torch.Tensor, text: torch.Tensor, raw_image: torch.Tensor | None = None,
                   raw_text: torch.Tensor | None = None) -> SimParts:
        return SimParts(image, text, self.similarity(image, text), raw_image, raw_text)

    def similarity(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """τ · f · Tᵀ: (B, E), (K, E) → (B, K)."""
        return self.backbone.logit_scale * image @ text.t().to(image.dtype)

    @property
    def backbone(self) -> nn.Module:
        """The ``CLIPBackbone`` (``self.model.clip`` unless a method holds it elsewhere)."""
        return self.model.clip

    def extra_loss(self, batch: dict[str, Any], parts: SimParts) -> torch.Tensor:
        """A method's regulariser added to the classification loss (none by default; KgCoOp's knowledge loss).
        With CSkip, ``batch["classes"]`` holds the kept classes that ``parts.text`` rows belong to."""
        return parts.logits.new_zeros(())

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self._plugin_on():
            parts, batch = self._skip_parts(batch)
        else:
            parts = self.forward_parts(batch["img"])
        loss = F.cross_entropy(parts.logits, batch["label"]) + self.extra_loss(batch, parts)
        return loss, {"acc": accuracy(parts.logits, batch["label"])}

    def eval_text_features(self) -> torch.Tensor | None:
        """Class text features computed once per evaluation and reused for every test batch; None when they
        depend on the image (CoCoOp), so each batch computes its own."""
        return None

    def before_evaluate(self) -> None:
        self._text = self.eval_text_features()

    def after_evaluate(self) -> None:
        self._text = None

    def inference(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(images, self._text).logits


@TRAINERS.register("CoOp", add_config=add_config, family="prompt", test_overrides=dict(trainable_params=16 * 64),
                   presets=dict(b2n="vit_b16_ep100", xd="vit_b16_ep50",  # few-shot: 50/100/200 epochs by K
                                fewshot={1: "vit_b16_ep50", 2: "vit_b16_ep100", 4: "vit_b16_ep100", 8: "vit_b16",
                                         16: "vit_b16"}))
class CoOp(PromptTrainer):
    """Context optimisation: learn the prompt's context words, keep CLIP frozen."""

    config_node = "COOP"
    config_reads = ("TRAINER.COOP",)  # also read by the methods that build on CoOp's prompt learner
    checkpoint_ignore_keys = ("token_prefix", "token_suffix", "token_midfix")

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        c = cfg.TRAINER.COOP
        if c.CLASS_TOKEN_POSITION not in POSITIONS:
            raise ValueError(f"TRAINER.COOP.CLASS_TOKEN_POSITION {c.CLASS_TOKEN_POSITION!r}: choose from {POSITIONS}")
        if c.CSC and c.CTX_INIT:
            raise ValueError("TRAINER.COOP.CSC needs random init: set TRAINER.COOP.CTX_INIT to '' or CSC to False")
        if not c.CTX_INIT and c.N_CTX < 1:
            raise ValueError(f"TRAINER.COOP.N_CTX must be >= 1, got {c.N_CTX}")

    def build_model(self) -> None:
        c = self.cfg.TRAINER.COOP
        clip = self.build_clip()
        prompt_learner = PromptLearner(clip, self.classnames, c.N_CTX, c.CTX_INIT, c.CSC, c.CLASS_TOKEN_POSITION)
        self.model = CoOpModel(clip, prompt_learner)
        self.register_model("prompt_learner", prompt_learner)
        self._text: torch.Tensor | None = None

    skip_plugin = True

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(images)

    def image_is_frozen(self) -> bool:
        return True

    def class_text_features(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.text_features() if classes is None else self.model.text_features(classes)

    def raw_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(images, normalize=False)

    def raw_class_text_features(self) -> torch.Tensor:
        # A subclass whose model's text_features takes no ``normalize`` (TCP's) fails here, loudly: its raw
        # features would need its own hooks.
        return self.model.text_features(normalize=False)

    def eval_text_features(self) -> torch.Tensor:
        return self.model.text_features()
