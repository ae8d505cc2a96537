"""CoPrompt: Roy, Etemad, *Consistency-guided Prompt Learning for Vision-Language Models*, ICLR 2024
(https://arxiv.org/abs/2306.01195). Reference: ShuvenduRoy/CoPrompt ``trainers/coprompt.py``, ``train.py`` and
``configs/trainers/vit_b16_c2_ep5_batch4_2ctx_randaug.yaml``.

Trainable: MaPLe-style multimodal prompts (``prompt_learner``: text context P_0 (M × D_t), its vision coupling
F_0 = Linear(D_t → D_v), deep text prompts P_i and couplings F_i for blocks 1..J−1) and two adapters (``adapter``:
A_v, A_t = Linear(E → E/4, no bias) → ReLU → Linear(E/4 → E, no bias) → ReLU). 3,817,216 parameters on ViT-B/16
with J = 9, M = 2; 12,672 on the tiny test CLIP with J = 2.

::

    text prompt c:  [SOS][P_0]["of a"][name_c][.][EOS]     (CTX_INIT "a photo of a": P_0 starts as "a photo")
    before text block i (1 ≤ i < J):   tokens 1..M ← P_i
    before image block 0:              append ln_pre(F_0(P_0)) after the CLS and patch tokens (no positional
                                       embedding); blocks 1 ≤ i < J: last M ← F_i(P_i) (raw, as upstream)
    f' = norm(0.1·A_v(f) + 0.9·f),  t'_c = norm(0.2·A_t(t_c) + 0.8·t_c),  logits = τ f' T'ᵀ
    L = CE(logits(x¹), y) + W·[(1 − mean_c cos(t'_c, g_c)) + (1 − mean_i cos(f'(x¹_i), f⁰(x²_i)))]   (DISTILL cosine)
    g_c = frozen CLIP text teacher of class c (this step's drawn description), f⁰ = frozen CLIP image feature of x²

Upstream (``VisionTransformer_MaPLe.forward``) appends F_0(P_0) before ``ln_pre``, so the first-layer vision prompt is
layer-normalised; vltune's ``embed_image`` ends with ``ln_pre``, so the hook appends ``ln_pre(F_0(P_0))`` (LayerNorm
is per token: the same tokens). Deeper vision prompts replace the last M tokens unnormalised, as upstream.

Descriptions (``TRAINER.CoPrompt.DESCRIPTIONS_FILE``): a JSON object ``{classname: [sentence, ...], ...}`` (the
upstream ``gpt_file/<dataset>_prompt.json`` format); keys are the raw class name or the name with ``_`` as spaces.
Every sentence is encoded once by frozen CLIP and normalised. ``TEACHER draw`` (default, upstream): each training step
draws one description per class, g_c = the feature of class c's k_c-th sentence. Upstream draws one index
k = random.randint(0, K − 1) per step, shared by all classes (its K sentences per class are stacked, so every class
must have K); vltune draws one u ~ U[0, 1) per step from the trainer's own ``random.Random`` and class c takes
k_c = ⌊u·n_c⌋ — with equal counts that is upstream's one shared, uniform index; with different counts each class's
index stays uniform over its own n_c sentences. The generator is reseeded from (SEED, epoch) at every epoch, so a
seeded run's draws depend only on (SEED, epoch, step) and a resumed run draws what an uninterrupted one did
(SEED < 0: an unseeded generator). ``description_indices()`` is the seam that returns a step's indices. ``TEACHER
mean``: g_c = the renormalised mean of class c's sentence features, fixed for the run (vltune's former teacher).
``scripts/build_descriptions.py`` writes such a file from lines ``classname: sentence``. Without a file, g_c is the
80-template ``IMAGENET_TEMPLATES`` ensemble (``DESCRIPTIONS_FALLBACK imagenet``) or the dataset's own template
(``dataset``), fixed under either TEACHER (the fallback is vltune's, upstream has none); ``method_record()`` reports
``descriptions: "templates"`` or ``"file: <path>"``.

Second view x²: the engine's loader applies the train transform K times when ``DATALOADER.K_TRANSFORMS`` ≥ 2
(upstream uses K_TRANSFORMS 2); the second tensor is x². With one view the trainer makes x² itself with a tensor-level
random horizontal flip (documented fallback: the loader keeps no raw image, and a flip is the one augmentation that is
valid for every dataset at any size); upstream never runs with one view.

Switches: ``PROMPT_DEPTH 0`` inserts no prompt tokens (only the shallow text context stays, the hand-crafted prompt at
init) and ``IMAGE_ADAPTER_RATIO``/``TEXT_ADAPTER_RATIO`` 0 make the adapters the identity: then CoPrompt's logits
are zero-shot CLIP's with the template ``"<CTX_INIT> {}."``.

Departures from upstream (methods.md §10): teachers come from the shared backbone without hooks, not from a second
CLIP; the description draw uses the trainer's own generator (upstream: Python's global ``random``), and classes may
have different description counts (upstream requires equal counts); ``TEACHER mean`` is a vltune option; the adapter
mix ratios are keys (upstream hard-codes 0.1 / 0.2); ``W`` and ``DISTILL`` live in the ``TRAINER.CoPrompt`` node
(upstream: ``TRAINER.W``, ``TRAINER.DISTILL``); no per-dataset overrides overwrite the command line; no ``cache/``
file; the checkpoint holds only the trainable tensors; a missing class in the description file is an error, not a
KeyError.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from trainers.coop import CoOp, SimParts, accuracy
from vltune.clip import BlockHooks
from vltune.clip.templates import IMAGENET_TEMPLATES
from vltune.registry import TRAINERS

logger = logging.getLogger(__name__)
DISTILLS = ("cosine", "mse")
FALLBACKS = ("imagenet", "dataset")
TEACHERS = ("draw", "mean")


def add_config(cfg: CN) -> None:
    """``TRAINER.CoPrompt``: upstream's mixed-case node name, so its yaml keys load (W/DISTILL moved inside)."""
    cfg.TRAINER.CoPrompt = CN()
    cfg.TRAINER.CoPrompt.N_CTX = 2  # M, prompt tokens per layer and tower
    cfg.TRAINER.CoPrompt.CTX_INIT = "a photo of a"  # hand-crafted prompt; P_0 starts as its first M tokens ("" random)
    cfg.TRAINER.CoPrompt.PREC = ""  # fp16 (CUDA) | amp | fp32; empty: TRAINER.PREC
    cfg.TRAINER.CoPrompt.PROMPT_DEPTH = 9  # J: blocks 0..J-1 of both towers get prompts; 0 = no prompt insertion
    cfg.TRAINER.CoPrompt.W = 1.0  # consistency-loss weight (upstream TRAINER.W); 0 = plain CE
    cfg.TRAINER.CoPrompt.DISTILL = "cosine"  # consistency criterion: cosine (1 - mean cos) | mse
    cfg.TRAINER.CoPrompt.IMAGE_ADAPTER_RATIO = 0.1  # f' = r·A_v(f) + (1 - r)·f; 0 = adapter off (upstream 0.1)
    cfg.TRAINER.CoPrompt.TEXT_ADAPTER_RATIO = 0.2  # t' = r·A_t(t) + (1 - r)·t; 0 = adapter off (upstream 0.2)
    cfg.TRAINER.CoPrompt.DESCRIPTIONS_FILE = ""  # JSON {classname: [sentence, ...]}; "" = template fallback
    # Text teacher from the descriptions file: draw (upstream) = one description per class per training step, drawn
    # from the trainer's generator reseeded from (SEED, epoch); mean = the renormalised mean of each class's
    # descriptions, fixed (not upstream). The template fallback is a fixed ensemble under either.
    cfg.TRAINER.CoPrompt.TEACHER = "draw"
    cfg.TRAINER.CoPrompt.DESCRIPTIONS_FALLBACK = "imagenet"  # no file: imagenet (80 templates) | dataset


class MultiModalPrompts(nn.Module):
    """Text context plus deep text prompts and their linear couplings into vision prompts (MaPLe's design).

    ``forward()`` returns the class prompt embeddings (C, L, D_t) without positions and their EOT indices (C,).
    """

    def __init__(self, clip: nn.Module, classnames: list[str], n_ctx: int, ctx_init: str, depth: int) -> None:
        super().__init__()
        names = [c.replace("_", " ") for c in classnames]
        dim_t, dim_v = clip.width_text, clip.width_image
        with torch.no_grad():
            phrase = ctx_init.replace("_", " ") if ctx_init else " ".join(["X"] * n_ctx)
            ids = clip.tokenize([f"{phrase} {name}." for name in names])
            eot = clip.eot_index(ids)
            embedding = clip.token_embedding(clip.cut_text(ids, eot)).clone()
            if ctx_init:  # upstream: the first M tokens of the phrase become P_0, the rest stays fixed text
                phrase_ids = clip.tokenize([phrase])
                if n_ctx > int(clip.eot_index(phrase_ids)[0]) - 1:
                    raise ValueError(f"TRAINER.CoPrompt.N_CTX {n_ctx} exceeds the token count of CTX_INIT "
                                     f"{ctx_init!r}; lower N_CTX or use a longer CTX_INIT ('' = random init)")
                ctx = clip.token_embedding(phrase_ids)[0, 1:1 + n_ctx].clone()
            else:
                ctx = nn.init.normal_(torch.empty(n_ctx, dim_t), std=0.02)
        self.ctx = nn.Parameter(ctx)
        self.n_ctx, self.depth = n_ctx, depth
        self.proj = nn.Linear(dim_t, dim_v) if depth > 0 else None
        deep = max(depth - 1, 0)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n_ctx, dim_t), std=0.02)) for _ in range(deep)])
        # upstream (MaPLe's learner): F_1..F_{J-1} start as copies of one Linear drawn after the P_i, apart from F_0
        single = nn.Linear(dim_t, dim_v) if depth > 0 else None
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(deep)])
        self.register_buffer("token_prefix", embedding[:, :1], persistent=False)  # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:], persistent=False)  # "of a", name, ".", EOS
        self.register_buffer("eot", eot, persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(self.token_prefix.shape[0], -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1), self.eot

    def hooks(self, ln_pre: nn.Module) -> DeepPromptHooks | None:
        """The block hooks carrying this step's deep prompts (None at depth 0); ``ln_pre``: the image tower's."""
        if self.depth == 0:
            return None
        vision = [self.proj(self.ctx)] + [f(p) for f, p in zip(self.compound_prompt_projections,
                                                                  self.compound_prompts_text)]
        return DeepPromptHooks(list(self.compound_prompts_text), vision, self.n_ctx, ln_pre)


class DeepPromptHooks(BlockHooks):
    """Text: before block i ≥ 1 (i < J) tokens 1..M ← P_i. Image: before block 0 append ln_pre(F_0(P_0)); before
    block i ≥ 1 (i < J) the last M tokens ← F_i(P_i). Blocks ≥ J propagate whatever arrives (MaPLe).

    Args:
        text: [P_1, ..., P_{J-1}], each (M, D_t).
        vision: [F_0(P_0), ..., F_{J-1}(P_{J-1})], each (M, D_v).
        n_ctx: M.
        ln_pre: the image tower's ``ln_pre``: upstream appends F_0(P_0) before it, vltune's block-0 input is after it.
    """

    def __init__(self, text: list[torch.Tensor], vision: list[torch.Tensor], n_ctx: int, ln_pre: nn.Module) -> None:
        self.text, self.vision, self.n, self.ln_pre = text, vision, n_ctx, ln_pre

    def before_block(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        if tower == "text":
            if not 1 <= i <= len(self.text):
                return x
            p = self.text[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, :1], p, x[:, 1 + self.n:]], dim=1)
        if i >= len(self.vision):
            return x
        p = self.vision[i].to(x.dtype)
        if i == 0:
            return torch.cat([x, self.ln_pre(p).to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return torch.cat([x[:, :-self.n], p.expand(x.shape[0], -1, -1)], dim=1)


class Adapter(nn.Module):
    """Upstream's ``Adapter(c_in, 4)``: Linear(E → E/4, no bias) → ReLU → Linear(E/4 → E, no bias) → ReLU."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                                nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class CoPromptModel(nn.Module):
    """Frozen CLIP + multimodal prompts + adapters. ``forward`` (B, 3, H, W) → logits (B, C)."""

    def __init__(self, clip: nn.Module, prompt_learner: MultiModalPrompts, adapter: nn.ModuleDict,
                 image_ratio: float, text_ratio: float) -> None:
        super().__init__()
        self.clip, self.prompt_learner, self.adapter = clip, prompt_learner, adapter
        self.image_ratio, self.text_ratio = image_ratio, text_ratio

    def hooks(self) -> DeepPromptHooks | None:
        """This step's deep-prompt hooks for both towers (None at depth 0)."""
        return self.prompt_learner.hooks(self.clip.model.visual.ln_pre)

    def text_features(self, hooks: DeepPromptHooks | None = None) -> torch.Tensor:
        """Prompted, adapted, normalised class text features (C, E)."""
        prompts, eot = self.prompt_learner()
        t = self.clip.encode_text_from_embeddings(prompts, eot, hooks=hooks)
        return F.normalize(self.text_ratio * self.adapter["text"](t) + (1 - self.text_ratio) * t, dim=-1)

    def image_features(self, images: torch.Tensor, hooks: DeepPromptHooks | None = None) -> torch.Tensor:
        """Prompted, adapted, normalised image features. Input: (B, 3, H, W). Output: (B, E)."""
        f = self.clip.encode_image(images, hooks=hooks)
        return F.normalize(self.image_ratio * self.adapter["image"](f) + (1 - self.image_ratio) * f, dim=-1)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        hooks = self.hooks()
        text = self.text_features(hooks) if text_features is None else text_features
        image = self.image_features(images, hooks)
        return self.clip.logit_scale * image @ text.t().to(image.dtype)


def read_descriptions(path: str, classnames: list[str]) -> list[list[str]]:
    """Sentences per class from a ``{classname: [sentence, ...]}`` JSON file, in ``classnames`` order.

    A key may be the raw class name or the name with ``_`` replaced by spaces. Raises ``ValueError`` naming the file
    and every missing or empty class.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{classname: [sentence, ...]}}, got {type(data).__name__}")
    out, missing = [], []
    for name in classnames:
        sentences = data.get(name, data.get(name.replace("_", " ")))
        if not sentences or not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            missing.append(name)
        out.append(sentences)
    if missing:
        raise ValueError(f"{path} has no descriptions (a non-empty list of strings) for class(es) {missing}; add them "
                         "(e.g. with scripts/build_descriptions.py) or set TRAINER.CoPrompt.DESCRIPTIONS_FILE ''")
    return out


@torch.no_grad()
def description_features(clip: nn.Module, descriptions: list[list[str]]) -> torch.Tensor:
    """The normalised frozen feature of every sentence, class by class (class c's n_c rows follow class c−1's).

    Output: (Σ_c n_c, E) float.
    """
    flat = [s for sentences in descriptions for s in sentences]
    return clip.encode_text(clip.tokenize(flat), normalize=True, batch_size=256).float()


def mean_per_class(features: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The renormalised mean of each class's rows of ``description_features``. Output: (C, E)."""
    return F.normalize(torch.stack([r.mean(dim=0) for r in torch.split(features, counts)]), dim=-1)


def consistency(student: torch.Tensor, teacher: torch.Tensor, criterion: str) -> torch.Tensor:
    """``1 − mean cos`` (cosine) or MSE between features. Input: (N, E) and (N, E), both normalised."""
    if criterion == "cosine":
        return 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-7).mean()
    return F.mse_loss(student.float(), teacher.float())


@TRAINERS.register("CoPrompt", add_config=add_config, family="prompt",
                   test_overrides=dict(trainable_params=12672,  # J = 2, M = 2: 8,576 prompts + 2 × 2,048 adapters
                                       opts={"TRAINER.CoPrompt.PROMPT_DEPTH": 2}),
                   presets=dict(b2n="vit_b16_c2_ep5_batch4_2ctx_randaug"),
                   no_preset=dict(xd="CoPrompt's cross-dataset procedure is undocumented upstream (CoPrompt#3) and "
                                     "its settings are still to be checked against the paper (methods.md §10)",
                                  fewshot="CoPrompt's few-shot settings are still to be checked against the paper "
                                          "(methods.md §10); there is no few-shot config for it"))
class CoPrompt(CoOp):
    """Multimodal prompts + adapters kept consistent with frozen CLIP on descriptions and a second view."""

    config_node = "CoPrompt"
    checkpoint_ignore_keys = ("token_prefix", "token_suffix")

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        c = cfg.TRAINER.CoPrompt
        if c.DISTILL not in DISTILLS:
            raise ValueError(f"TRAINER.CoPrompt.DISTILL {c.DISTILL!r}: choose from {DISTILLS}")
        if c.TEACHER not in TEACHERS:
            raise ValueError(f"TRAINER.CoPrompt.TEACHER {c.TEACHER!r}: choose from {TEACHERS}")
        if c.DESCRIPTIONS_FALLBACK not in FALLBACKS:
            raise ValueError(f"TRAINER.CoPrompt.DESCRIPTIONS_FALLBACK {c.DESCRIPTIONS_FALLBACK!r}: choose from "
                             f"{FALLBACKS}")
        if c.N_CTX < 1 or c.PROMPT_DEPTH < 0:
            raise ValueError(f"TRAINER.CoPrompt needs N_CTX >= 1 and PROMPT_DEPTH >= 0, got {c.N_CTX}, "
                             f"{c.PROMPT_DEPTH}")
        for key in ("IMAGE_ADAPTER_RATIO", "TEXT_ADAPTER_RATIO"):
            if not 0.0 <= c[key] <= 1.0:
                raise ValueError(f"TRAINER.CoPrompt.{key} must lie in [0, 1], got {c[key]}")

    def build_model(self) -> None:
        c = self.cfg.TRAINER.CoPrompt
        clip = self.build_clip().to(self.device)  # teachers are encoded on the run's device
        depth = int(c.PROMPT_DEPTH)
        n_blocks = min(clip.n_layers_text, clip.n_layers_image)
        if depth > n_blocks:
            raise ValueError(f"TRAINER.CoPrompt.PROMPT_DEPTH {depth} exceeds the {n_blocks} blocks of "
                             f"{self.cfg.MODEL.BACKBONE.NAME}; choose 0..{n_blocks}")
        prompt_learner = MultiModalPrompts(clip, self.classnames, int(c.N_CTX), c.CTX_INIT, depth)
        adapter = nn.ModuleDict({"image": Adapter(clip.embed_dim), "text": Adapter(clip.embed_dim)})
        self.model = CoPromptModel(clip, prompt_learner, adapter, float(c.IMAGE_ADAPTER_RATIO),
                                   float(c.TEXT_ADAPTER_RATIO))
        self.register_model("prompt_learner", prompt_learner)
        self.register_model("adapter", adapter)
        self.weight, self.distill = float(c.W), c.DISTILL
        self.descriptions = f"file: {c.DESCRIPTIONS_FILE}" if c.DESCRIPTIONS_FILE else "templates"
        self._warned_one_view = False
        self._text: torch.Tensor | None = None
        # The description draw has its own generator (never the global RNG), reseeded from (SEED, epoch) in
        # before_epoch; seeded for epoch 0 here so that steps outside the loop are reproducible too.
        self._draws = random.Random()
        self._seed_draws(0)
        # The teacher is needed only for training: eval-only runs on new classes need no descriptions for them.
        bank, counts = (None, None) if self.eval_only else self.text_teacher(
            clip, c.DESCRIPTIONS_FILE, c.DESCRIPTIONS_FALLBACK, c.TEACHER)
        # teacher_bank: the sentence features, class by class; class c's rows start at teacher_offsets[c]
        self.teacher_counts = counts
        offsets = None if counts is None else torch.tensor([0] + counts[:-1], device=bank.device).cumsum(0)
        self.model.register_buffer("teacher_bank", bank, persistent=False)
        self.model.register_buffer("teacher_offsets", offsets, persistent=False)

    def text_teacher(self, clip: nn.Module, path: str, fallback: str, mode: str) -> tuple[torch.Tensor, list[int]]:
        """The frozen CLIP text teacher: features (N, E) and the number of rows per class (C,), from the
        description file (TEACHER draw: every sentence; mean: one mean row per class), or the template fallback
        (one ensemble row per class)."""
        if path:
            logger.info(f"CoPrompt descriptions: {path} (teacher: {mode})")
            descriptions = read_descriptions(path, self.classnames)
            counts = [len(s) for s in descriptions]
            feats = description_features(clip, descriptions)
            if mode == "mean":
                return mean_per_class(feats, counts), [1] * len(counts)
            return feats, counts
        templates = list(IMAGENET_TEMPLATES) if fallback == "imagenet" else [self.template]
        logger.info(f"CoPrompt descriptions: none given (TRAINER.CoPrompt.DESCRIPTIONS_FILE); the text teacher is "
                    f"the {fallback} template ensemble ({len(templates)} templates)")
        return clip.zero_shot_classifier(self.classnames, templates).float(), [1] * len(self.classnames)

    def _seed_draws(self, epoch: int) -> None:
        seed = int(self.cfg.SEED)
        if seed >= 0:
            self._draws.seed(seed * 1_000_003 + epoch)

    def before_epoch(self) -> None:
        super().before_epoch()
        self._seed_draws(self.epoch)

    def description_indices(self) -> torch.Tensor:
        """This step's description index per class (C,) long: one u ~ U[0, 1) from the trainer's generator, class c
        takes ⌊u·n_c⌋ (equal counts: one uniform index shared by all classes, as upstream's per-step
        ``random.randint(0, K − 1)``). A test may replace it on the instance to force a draw."""
        u = self._draws.random()
        return torch.tensor([min(int(u * n), n - 1) for n in self.teacher_counts], dtype=torch.long)

    def step_text_teacher(self) -> torch.Tensor:
        """g for this training step: (C, E), one row per class (drawn when a class has several)."""
        bank = self.model.teacher_bank
        if max(self.teacher_counts) == 1:
            return bank
        indices = self.description_indices()
        if not ((indices >= 0) & (indices < torch.tensor(self.teacher_counts))).all():
            raise ValueError(f"CoPrompt description indices {indices.tolist()} outside the per-class counts "
                             f"{self.teacher_counts}")
        return bank[self.model.teacher_offsets + indices.to(bank.device)]

    def method_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"descriptions": self.descriptions}
        if self.descriptions == "templates":
            record["description_templates"] = self.cfg.TRAINER.CoPrompt.DESCRIPTIONS_FALLBACK
        return record

    def views(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x¹, x²): the loader's first two views (K_TRANSFORMS ≥ 2), else x¹ and a random horizontal flip of it."""
        img = batch["img"]
        if isinstance(img, (list, tuple)) and len(img) >= 2:
            return img[0], img[1]
        x1 = img[0] if isinstance(img, (list, tuple)) else img
        if not self._warned_one_view:
            logger.info("CoPrompt: one view per image (DATALOADER.K_TRANSFORMS 1); the second view is a random "
                        "horizontal flip. Upstream uses K_TRANSFORMS 2.")
            self._warned_one_view = True
        flip = torch.rand(x1.shape[0], device=x1.device) < 0.5
        return x1, torch.where(flip[:, None, None, None], x1.flip(-1), x1)

    def forward_parts(self, images: torch.Tensor, text: torch.Tensor | None = None) -> SimParts:
        """Prompted+adapted image features (B, E), class text features (C, E; ``text`` if cached) and logits."""
        hooks = self.model.hooks()
        text = self.model.text_features(hooks) if text is None else text
        image = self.model.image_features(images, hooks)
        return SimParts(image, text, self.model.clip.logit_scale * image @ text.t().to(image.dtype))

    def extra_loss(self, batch: dict[str, Any], parts: SimParts) -> torch.Tensor:
        """W · [text consistency with g + image consistency with frozen CLIP on the second view]."""
        if self.weight == 0:
            return parts.logits.new_zeros(())
        with torch.no_grad():
            frozen = self.model.clip.encode_image(self.views(batch)[1], normalize=True)
        text = consistency(parts.text, self.step_text_teacher(), self.distill)
        return self.weight * (text + consistency(parts.image, frozen, self.distill))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        parts = self.forward_parts(self.views(batch)[0])
        loss = F.cross_entropy(parts.logits, batch["label"]) + self.extra_loss(batch, parts)
        return loss, {"acc": accuracy(parts.logits, batch["label"])}

    def eval_text_features(self) -> torch.Tensor:
        return self.model.text_features(self.model.hooks())
