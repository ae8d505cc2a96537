"""The base every CLIP classification method in ``trainers/`` builds on: features, one similarity, frozen teachers and
a losses dict.

``PromptTrainer`` is the contract: image features, class text features (optionally of a class subset), logits from
the backbone's one ``similarity`` (τ · f · Tᵀ), class text cached once per evaluation, frozen teachers built once the
model sits on its device in its precision (``build_teachers``, an engine hook), and ``losses(batch)``: CE plus the
method's ``regularizers``, every term logged per step and per epoch and recorded in ``result.json`` (the objective
is their sum, open_clip's ``*_loss`` convention). Plugins build on it: DePT (``trainers/dept.py``) through
``forward_parts(..., raw=True)`` and ``regularizers``; the Skip plugin (``vltune.tuners.skip_plugin``) through the
feature split below.

Also here, because several methods share them: CoOp's ``PromptLearner`` (the learnable context around class-name
tokens: CoOp, CoCoOp, PromptSRC and TCP build their text prompts on it), ``PromptModel`` (frozen CLIP + a prompt
learner + optional block hooks per tower), the bias-free ``Adapter`` (CLIP-Adapter, CoPrompt) and the
``knowledge_loss`` (KgCoOp, TCP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from vltune.clip.backbone import BlockHooks
from vltune.engine import TrainerX
from vltune.tuners.skip_plugin import SkipPluginMixin

POSITIONS = ("end", "middle", "front")


@dataclass
class SimParts:
    """What a CLIP method computes for a batch, for its losses and for plugins such as DePT.

    ``image``: normalised image features (B, E); ``text``: normalised class text features, (C, E) or per image
    (B, C, E); ``logits``: ``similarity(image, text)`` (B, C). ``raw_image``, ``raw_text``: the encoder outputs that
    ``image`` and ``text`` normalise, filled only when ``forward_parts(..., raw=True)`` asks for them (DePT's FiLM and
    head read them); ``raw_text`` stays None when ``text`` was passed in (the evaluation's cached class features).
    """

    image: torch.Tensor
    text: torch.Tensor
    logits: torch.Tensor
    raw_image: torch.Tensor | None = None
    raw_text: torch.Tensor | None = None


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(dim=1) == labels).float().mean() * 100)


def knowledge_loss(text: torch.Tensor, hand_crafted: torch.Tensor) -> torch.Tensor:
    """KgCoOp's and TCP's L_kg: ½ · mean over classes of ‖t_c − w_c‖², a scalar computed in fp32.

    For unit vectors this is the official codes' ``1 − mean_c cos(t_c, w_c)`` (and has the same gradient through the
    normalisation), but it is exactly zero when the two are equal. Input: normalised learned class features (C, E) or
    per image (B, C, E); normalised hand-crafted features (C, E).
    """
    return 0.5 * (text.float() - hand_crafted.float()).pow(2).sum(dim=-1).mean()


class Adapter(nn.Module):
    """CLIP-Adapter's bottleneck ``ReLU(W₂ ReLU(W₁ x))`` without biases, (…, d) → (…, d); W₁: d/r × d, W₂: d × d/r.
    CoPrompt uses the same module (r = 4) on both towers."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def check_context(cfg_node: CN, where: str) -> None:
    """Validate CoOp-style context keys (``N_CTX``, ``CSC``, ``CTX_INIT``, ``CLASS_TOKEN_POSITION``) of ``where``."""
    c = cfg_node
    if c.CLASS_TOKEN_POSITION not in POSITIONS:
        raise ValueError(f"{where}.CLASS_TOKEN_POSITION {c.CLASS_TOKEN_POSITION!r}: choose from {POSITIONS}")
    if c.CSC and c.CTX_INIT:
        raise ValueError(f"{where}.CSC needs random init: set {where}.CTX_INIT to '' or CSC to False")
    if not c.CTX_INIT and c.N_CTX < 1:
        raise ValueError(f"{where}.N_CTX must be >= 1, got {c.N_CTX}")


class PromptLearner(nn.Module):
    """CoOp's learnable context around frozen class-name token embeddings.

    Output of ``forward()``: prompt token embeddings (C, L, D) without positional embedding, and EOT indices (C,),
    with L cut to the longest prompt (text truncation gives identical features). ``ctx`` is M × D (or C × M × D with
    ``csc``), from ``ctx_init``'s token embeddings or N(0, 0.02²); the prefix/suffix buffers are rebuilt from the class
    names (never saved).
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


class PromptModel(nn.Module):
    """Frozen CLIP + a prompt learner (``forward(classes=None) -> (embeddings, eot)``), with optional block hooks.

    ``text_hooks()`` / ``image_hooks()`` (None by default) carry a method's deep prompts or injections; they are built
    per call, so trainable prompts stay in the graph. Without image hooks nothing on the image path trains, and the
    image features are computed without autograd.
    """

    def __init__(self, clip: nn.Module, prompt_learner: nn.Module) -> None:
        super().__init__()
        self.clip, self.prompt_learner = clip, prompt_learner

    def text_hooks(self) -> BlockHooks | None:
        return None

    def image_hooks(self) -> BlockHooks | None:
        return None

    def text_features(self, classes: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """Class text features (C, E) from the current prompts (of ``classes`` only, if given); normalised unless
        ``normalize`` is False (the encoder output)."""
        prompts, eot = self.prompt_learner() if classes is None else self.prompt_learner(classes)
        return self.clip.encode_text_from_embeddings(prompts, eot, hooks=self.text_hooks(), normalize=normalize)

    def image_features(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features (B, E); normalised unless ``normalize`` is False (the encoder output)."""
        hooks = self.image_hooks()
        if hooks is None:
            with torch.no_grad():
                return self.clip.encode_image(images, normalize=normalize)
        return self.clip.encode_image(images, hooks=hooks, normalize=normalize)


class PromptTrainer(SkipPluginMixin, TrainerX):
    """The CLIP methods' trainer contract.

    A method builds ``self.model`` whose ``clip`` is the backbone (or overrides ``backbone``) and, by default, whose
    ``text_features(classes=None, normalize=True)`` and ``image_features(images, normalize=True)`` give the features
    (``PromptModel`` does); it adds its regularisers in ``regularizers`` and its frozen references in
    ``build_teachers``. ``forward_parts`` gives features and logits; ``losses`` is ``{"ce": …, **regularizers}``.

    Feature split (the Skip plugin's cache): a method whose image path up to ``image_from_frozen`` has nothing
    trainable says so with ``image_is_frozen()`` and defines ``frozen_image_features``; the default image path is
    the model's. **The Skip plugin** (``TRAINER.SKIP_PLUGIN``; see ``vltune.tuners.skip_plugin``): a class whose
    ``forward_parts`` is ``image_features`` + ``class_text_features`` + τ·cos and whose ``regularizers`` accept a class
    subset (``batch["classes"]``) opts in with ``skip_plugin = True`` in its own body (never inherited).
    """

    _text: torch.Tensor | None = None  # the evaluation's cached class text features
    #: the prompt buffers upstream learners save and vltune rebuilds from the class names (older files carry them)
    checkpoint_ignore_keys = ("token_prefix", "token_suffix", "token_midfix")

    # ---- features ----------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        """The ``CLIPBackbone`` (``self.model.clip`` unless a method holds it elsewhere)."""
        return self.model.clip

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features (B, E)."""
        if self.image_is_frozen():
            return self.image_from_frozen(self.frozen_image_features(images))
        return self.model.image_features(images)

    def image_is_frozen(self) -> bool:
        """Whether ``frozen_image_features`` is defined: nothing trainable acts before ``image_from_frozen``."""
        return False

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The part of the image path no trainable tensor influences (pixels → features)."""
        raise NotImplementedError(f"{type(self).__name__}'s image path trains: it has no frozen image features")

    def image_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        """The rest of the image path, from ``frozen_image_features`` to the normalised features."""
        return frozen

    def class_text_features(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised text features (K, E) of the training classes ``classes`` (all when None), with grad when they
        train; computing only the given classes is what makes CSkip cheap."""
        return self.model.text_features() if classes is None else self.model.text_features(classes)

    def raw_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image encoder's output (B, E) before normalisation (DePT's FiLM reads it)."""
        return self.model.image_features(images, normalize=False)

    def raw_class_text_features(self) -> torch.Tensor:
        """The text encoder's output (C, E) for all classes before normalisation."""
        return self.model.text_features(normalize=False)

    def similarity(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """τ · f · Tᵀ (``CLIPBackbone.similarity``): (B, E) with (K, E) or (B, K, E) → (B, K)."""
        return self.backbone.similarity(image, text)

    def make_parts(self, image: torch.Tensor, text: torch.Tensor, raw_image: torch.Tensor | None = None,
                   raw_text: torch.Tensor | None = None) -> SimParts:
        return SimParts(image, text, self.similarity(image, text), raw_image, raw_text)

    def forward_parts(self, images: torch.Tensor, text: torch.Tensor | None = None, raw: bool = False) -> SimParts:
        """Image features, class text features (``text`` if given: cached at evaluation) and their logits.

        ``raw``: also keep the encoder outputs before normalisation (``SimParts.raw_image``/``raw_text``); the
        normalised features and logits are the same.
        """
        if raw:
            raw_image = self.raw_image_features(images)
            raw_text = self.raw_class_text_features() if text is None else None
            image = F.normalize(raw_image, dim=-1)
            text = F.normalize(raw_text, dim=-1) if text is None else text
            return self.make_parts(image, text, raw_image, raw_text)
        return self.make_parts(self.image_features(images), self.class_text_features() if text is None else text)

    # ---- frozen teachers ---------------------------------------------------------------------------------------
    def frozen_class_features(self, templates: list[str]) -> torch.Tensor:
        """Normalised zero-shot class features (C, E) of ``templates`` (ensembled when several) from the frozen
        backbone, fp32: what a teacher built in ``build_teachers`` usually holds."""
        return self.backbone.zero_shot_classifier(self.classnames, templates).detach().float()

    def teacher(self, name: str) -> torch.Tensor:
        """The frozen reference ``name`` that ``build_teachers`` stored in ``self.teachers``."""
        if name not in self.teachers:
            when = " (built for training runs only)" if self.eval_only else ""
            raise RuntimeError(f"{type(self).__name__} has no teacher {name!r}{when}; build_teachers() makes "
                               f"{sorted(self.teachers) or 'none'}")
        return self.teachers[name]

    # ---- objective ---------------------------------------------------------------------------------------------
    def training_parts(self, batch: dict[str, Any]) -> tuple[SimParts, dict[str, Any]]:
        """Parts of a training batch and the batch its losses read (the Skip plugin may remap labels)."""
        if self._plugin_on():
            return self._skip_parts(batch)
        return self.forward_parts(batch["img"]), batch

    def regularizers(self, batch: dict[str, Any], parts: SimParts) -> dict[str, torch.Tensor]:
        """A method's weighted loss terms besides CE (none by default), each logged and recorded under its name.
        With CSkip, ``batch["classes"]`` holds the kept classes that ``parts.text`` rows belong to."""
        return {}

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        parts, batch = self.training_parts(batch)
        self.log_metric("acc", accuracy(parts.logits, batch["label"]))
        return {"ce": F.cross_entropy(parts.logits, batch["label"]), **self.regularizers(batch, parts)}

    # ---- evaluation --------------------------------------------------------------------------------------------
    def eval_text_features(self) -> torch.Tensor | None:
        """Class text features computed once per evaluation and reused for every test batch; None when they
        depend on the image (CoCoOp), so each batch computes its own."""
        return self.class_text_features()

    def before_evaluate(self) -> None:
        self._text = self.eval_text_features()

    def after_evaluate(self) -> None:
        self._text = None

    def inference(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(images, self._text).logits
