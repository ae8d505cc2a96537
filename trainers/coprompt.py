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

import json
import logging
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from vltune.clip.templates import IMAGENET_TEMPLATES
from vltune.registry import TRAINERS
from vltune.tuners.deep_prompts import CoupledPrompts, DeepPromptModel
from vltune.tuners.prompting import Adapter, PromptTrainer, SimParts

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


class CoPromptModel(DeepPromptModel):
    """Frozen CLIP + coupled prompts (MaPLe's ``CoupledPrompts``) + adapters on both towers' features."""

    def __init__(self, clip: nn.Module, prompt_learner: CoupledPrompts, adapter: nn.ModuleDict,
                 image_ratio: float, text_ratio: float) -> None:
        super().__init__(clip, prompt_learner)
        self.adapter, self.image_ratio, self.text_ratio = adapter, image_ratio, text_ratio

    def text_features(self) -> torch.Tensor:
        """Prompted, adapted, normalised class text features t' (C, E)."""
        t = super().text_features(normalize=False)
        return F.normalize(self.text_ratio * self.adapter["text"](t) + (1 - self.text_ratio) * t, dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Prompted, adapted, normalised image features f'. Input: (B, 3, H, W). Output: (B, E)."""
        f = super().image_features(images, normalize=False)
        return F.normalize(self.image_ratio * self.adapter["image"](f) + (1 - self.image_ratio) * f, dim=-1)


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
class CoPrompt(PromptTrainer):
    """Multimodal prompts + adapters kept consistent with frozen CLIP on descriptions and a second view."""

    config_node = "CoPrompt"

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
        clip = self.build_clip()
        depth = int(c.PROMPT_DEPTH)
        n_blocks = min(clip.n_layers_text, clip.n_layers_image)
        if depth > n_blocks:
            raise ValueError(f"TRAINER.CoPrompt.PROMPT_DEPTH {depth} exceeds the {n_blocks} blocks of "
                             f"{self.cfg.MODEL.BACKBONE.NAME}; choose 0..{n_blocks}")
        prompt_learner = CoupledPrompts(clip, self.classnames, int(c.N_CTX), c.CTX_INIT, depth, shallow=True,
                                        where="TRAINER.CoPrompt.CTX_INIT")
        adapter = nn.ModuleDict({"image": Adapter(clip.embed_dim), "text": Adapter(clip.embed_dim)})
        self.model = CoPromptModel(clip, prompt_learner, adapter, float(c.IMAGE_ADAPTER_RATIO),
                                   float(c.TEXT_ADAPTER_RATIO))
        self.register_model("prompt_learner", prompt_learner)
        self.register_model("adapter", adapter)
        self.weight, self.distill = float(c.W), c.DISTILL
        self.descriptions = f"file: {c.DESCRIPTIONS_FILE}" if c.DESCRIPTIONS_FILE else "templates"
        self._warned_one_view = False
        # The description draw has its own generator (never the global RNG), reseeded from (SEED, epoch) in
        # before_epoch; seeded for epoch 0 here so that steps outside the loop are reproducible too.
        self._draws = random.Random()
        self._seed_draws(0)

    def build_teachers(self) -> None:
        """The text teacher, for training only (eval-only runs on new classes need no descriptions for them):
        ``teachers["text"]``, the sentence features class by class, class c's ``teacher_counts[c]`` rows starting
        at ``teacher_offsets[c]``."""
        if self.eval_only:
            return
        c = self.cfg.TRAINER.CoPrompt
        bank, self.teacher_counts = self.text_teacher(c.DESCRIPTIONS_FILE, c.DESCRIPTIONS_FALLBACK, c.TEACHER)
        self.teachers["text"] = bank
        self.teacher_offsets = torch.tensor([0] + self.teacher_counts[:-1], device=bank.device).cumsum(0)

    def text_teacher(self, path: str, fallback: str, mode: str) -> tuple[torch.Tensor, list[int]]:
        """The frozen CLIP text teacher: features (N, E) and the number of rows per class (C,), from the
        description file (TEACHER draw: every sentence; mean: one mean row per class), or the template fallback
        (one ensemble row per class)."""
        if path:
            logger.info(f"CoPrompt descriptions: {path} (teacher: {mode})")
            descriptions = read_descriptions(path, self.classnames)
            counts = [len(s) for s in descriptions]
            feats = description_features(self.backbone, descriptions)
            if mode == "mean":
                return mean_per_class(feats, counts), [1] * len(counts)
            return feats, counts
        templates = list(IMAGENET_TEMPLATES) if fallback == "imagenet" else [self.template]
        logger.info(f"CoPrompt descriptions: none given (TRAINER.CoPrompt.DESCRIPTIONS_FILE); the text teacher is "
                    f"the {fallback} template ensemble ({len(templates)} templates)")
        return self.frozen_class_features(templates), [1] * len(self.classnames)

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
        bank = self.teacher("text")
        if max(self.teacher_counts) == 1:
            return bank
        indices = self.description_indices()
        if not ((indices >= 0) & (indices < torch.tensor(self.teacher_counts))).all():
            raise ValueError(f"CoPrompt description indices {indices.tolist()} outside the per-class counts "
                             f"{self.teacher_counts}")
        return bank[self.teacher_offsets + indices.to(bank.device)]

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

    def training_parts(self, batch: dict[str, Any]) -> tuple[SimParts, dict[str, Any]]:
        """The parts of the first view x¹ (the second view feeds the image consistency)."""
        return self.forward_parts(self.views(batch)[0]), batch

    def regularizers(self, batch: dict[str, Any], parts: SimParts) -> dict[str, torch.Tensor]:
        """W · text consistency with g, and W · image consistency with frozen CLIP on the second view (none at W 0)."""
        if self.weight == 0:
            return {}
        with torch.no_grad():
            frozen = self.backbone.encode_image(self.views(batch)[1], normalize=True)
        return {"text_consistency": self.weight * consistency(parts.text, self.step_text_teacher(), self.distill),
                "image_consistency": self.weight * consistency(parts.image, frozen, self.distill)}
