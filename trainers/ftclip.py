"""FT-CLIP: full fine-tuning of both CLIP towers, the baseline of Wu et al., *Skip Tuning: Pre-trained
Vision-Language Models are Effective and Efficient Adapters*, CVPR 2025 (https://arxiv.org/abs/2412.11509).
Reference: Koorye/SkipTuning ``trainers/baselines/ft_clip.py`` (no license; re-implemented).

Trainable: every CLIP tensor except the prefix modules (frozen unless listed in
``TRAINER.FINETUNE.LEARNABLE_PREFIX_MODULES``, ``+``-joined): ``te`` token embedding, ``tpe`` text positional
embedding, ``ce`` class embedding, ``conv`` ``conv1``, ``ln`` ``ln_pre``, ``ipe`` image positional embedding; the
first ``START_LAYER`` blocks of both towers (still executed); the whole text tower when ``LEARNABLE_TEXT`` is False
(its class features are then encoded once per class set), the whole image tower when ``LEARNABLE_IMAGE`` is False
(image features computed without autograd); and ``logit_scale`` (always). Prompts use the per-dataset FT template
(``FT_TEMPLATES``, methods.md §13.7), falling back to the dataset's own template. L = CE(τ · f · Tᵀ, y).

Staged LR (SkipTuning's rule, methods.md §13.6): image-tower tensors get ``TRAINER.FINETUNE.IMAGE_LR`` and the rest
``TRAINER.FINETUNE.TEXT_LR``; either one <= 0 means ``OPTIM.LR``.

Departures from upstream: checkpoints hold the trainable tensors only (not both full encoders); text features are
computed once per evaluation (not per test batch) and once per run when the text tower is frozen; the shipped
configs use ``amp`` (fp32 master weights + GradScaler) instead of pure fp16 SGD without loss scaling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from yacs.config import CfgNode as CN

from vltune.registry import TRAINERS
from vltune.tuners.prompting import PromptTrainer

#: methods.md §13.7, keyed by DATASET.NAME (tuned hyper-parameters of the reference; copied verbatim)
FT_TEMPLATES = {
    "ImageNet": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "SUN397": "a photo of a {}.",
    "ImageNetSketch": "a sketch of a {}.",
    "ImageNetA": "a bad photo of a {}.",
    "ImageNetR": "a rendition of a {}.",
    "Caltech101": "itap of a {}.",
    "DescribableTextures": "itap of a {}.",
    "EuroSAT": "a centered satellite photo of {}.",
    "FGVCAircraft": "a bright photo of a {}, a type of aircraft.",
    "Food101": "a photo of the nice {}.",
    "OxfordFlowers": "a close-up photo of a {}.",
    "OxfordPets": "a bad photo of a {}, a type of pet.",
    "StanfordCars": "a photo of the {}, a type of car.",
    "UCF101": "a photo of a {}, a type of sport.",
}

PREFIX_MODULES = ("te", "tpe", "ce", "conv", "ln", "ipe")


def add_config(cfg: CN) -> None:
    """``TRAINER.FINETUNE``."""
    cfg.TRAINER.FINETUNE = CN()
    cfg.TRAINER.FINETUNE.LEARNABLE_PREFIX_MODULES = ""  # "+"-joined subset of te+tpe+ce+conv+ln+ipe to unfreeze
    cfg.TRAINER.FINETUNE.START_LAYER = 0  # freeze blocks 0..k-1 of both towers (still executed)
    cfg.TRAINER.FINETUNE.LEARNABLE_TEXT = True  # False: text tower frozen, class features encoded once
    cfg.TRAINER.FINETUNE.LEARNABLE_IMAGE = True  # False: image tower frozen, features without autograd
    cfg.TRAINER.FINETUNE.TEXT_LR = 0.0  # LR of the text side (everything outside the image tower); <= 0: OPTIM.LR
    cfg.TRAINER.FINETUNE.IMAGE_LR = 0.0  # LR of the image tower; <= 0: OPTIM.LR
    cfg.TRAINER.FINETUNE.PREC = ""  # fp16 (CUDA) | amp | fp32; empty: TRAINER.PREC


def ft_template(dataset_name: str, fallback: str) -> str:
    """The FT-CLIP / Skip Tuning template of a dataset, else ``fallback`` (the dataset's own template)."""
    return FT_TEMPLATES.get(dataset_name, fallback)


def prefix_names(clip: nn.Module) -> dict[str, list[str]]:
    """Prefix module key → parameter names (in ``CLIPBackbone.named_parameters()``)."""
    m = "model."
    return {"te": [m + "token_embedding.weight"], "tpe": [m + "positional_embedding"],
            "ce": [m + "visual.class_embedding"],
            "conv": [n for n, _ in clip.named_parameters() if n.startswith(m + "visual.conv1.")],
            "ln": [n for n, _ in clip.named_parameters() if n.startswith(m + "visual.ln_pre.")],
            "ipe": [m + "visual.positional_embedding"]}


def is_image_param(name: str) -> bool:
    return name.startswith("model.visual.")


def frozen_names(clip: nn.Module, learnable_prefix: set[str], start_layer: int, text: bool,
                 image: bool) -> set[str]:
    """The names of every CLIP parameter FT-CLIP keeps frozen."""
    names = {n for n, _ in clip.named_parameters()}
    frozen = {"model.logit_scale"} | {n for n in names if n.startswith("model.logit_bias")}
    for key, ps in prefix_names(clip).items():
        if key not in learnable_prefix:
            frozen |= set(ps)
    blocks = [f"model.transformer.resblocks.{i}." for i in range(start_layer)]
    blocks += [f"model.visual.transformer.resblocks.{i}." for i in range(start_layer)]
    frozen |= {n for n in names if n.startswith(tuple(blocks))} if blocks else set()
    if not text:
        frozen |= {n for n in names if not is_image_param(n)}
    if not image:
        frozen |= {n for n in names if is_image_param(n)}
    return frozen


@TRAINERS.register("FinetuneCLIP", aliases=("FTCLIP",), add_config=add_config, family="finetune",
                   test_overrides=dict(trainable_params=208_384),
                   presets=dict(b2n="vit_b16_ep10_bs4", xd="vit_b16_ep10_bs4_cross_datasets"),
                   no_preset=dict(fewshot="FT-CLIP is Skip Tuning's full fine-tuning baseline for base-to-new and "
                                  "cross-dataset; few-shot is not defined upstream (methods.md §12)"))
class FinetuneCLIP(PromptTrainer):
    """Fine-tune CLIP's encoders (minus the prefix modules and ``logit_scale``) with CE on the FT template."""

    config_node = "FINETUNE"

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        c = cfg.TRAINER.FINETUNE
        unknown = [k for k in self._prefix(c) if k not in PREFIX_MODULES]
        if unknown:
            raise ValueError(f"TRAINER.FINETUNE.LEARNABLE_PREFIX_MODULES: unknown {unknown}; choose from "
                             f"{'+'.join(PREFIX_MODULES)}")
        if c.START_LAYER < 0:
            raise ValueError(f"TRAINER.FINETUNE.START_LAYER must be >= 0, got {c.START_LAYER}")
        if not (c.LEARNABLE_TEXT or c.LEARNABLE_IMAGE):
            raise ValueError("TRAINER.FINETUNE: LEARNABLE_TEXT and LEARNABLE_IMAGE are both False; nothing trains "
                             "(use ZeroshotCLIP)")

    @staticmethod
    def _prefix(c: CN) -> set[str]:
        return {k.strip() for k in str(c.LEARNABLE_PREFIX_MODULES).split("+") if k.strip()}

    #: the config key that sets how many leading blocks of both towers are frozen
    depth_key = "FINETUNE.START_LAYER"

    def frozen_depth(self) -> int:
        """How many leading blocks of both towers are frozen (``TRAINER.<depth_key>``)."""
        node, key = self.depth_key.split(".")
        return int(self.cfg.TRAINER[node][key])

    def build_model(self) -> None:
        c = self.cfg.TRAINER.FINETUNE
        clip = self.build_clip()
        depth = self.frozen_depth()
        if depth > min(clip.n_layers_text, clip.n_layers_image):
            raise ValueError(f"TRAINER.{self.depth_key} {depth} exceeds the towers' depth "
                             f"({clip.n_layers_text} text / {clip.n_layers_image} image blocks)")
        self.ft_template = ft_template(self.cfg.DATASET.NAME, self.template)
        self.learn_text, self.learn_image = bool(c.LEARNABLE_TEXT), bool(c.LEARNABLE_IMAGE)
        self.frozen = frozen_names(clip, self._prefix(c), depth, self.learn_text, self.learn_image)
        self.model = clip
        self.register_model("clip", clip)
        self._frozen_text: dict[tuple[str, ...], torch.Tensor] = {}  # LEARNABLE_TEXT=False: once per class set
        self.text_encodings = 0  # how many times the class prompts were encoded (tests, logs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if n not in self.frozen]

    def param_groups(self, name: str, module: nn.Module, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        c, base = self.cfg.TRAINER.FINETUNE, float(self.cfg.OPTIM.LR)
        wanted = {id(p) for p in params}
        text_lr = float(c.TEXT_LR) if c.TEXT_LR > 0 else base
        image_lr = float(c.IMAGE_LR) if c.IMAGE_LR > 0 else base
        groups = [dict(name="text", lr=text_lr, params=[]), dict(name="image", lr=image_lr, params=[])]
        for n, p in module.named_parameters():
            if id(p) in wanted:
                groups[int(is_image_param(n))]["params"].append(p)
        return [g for g in groups if g["params"]]

    def _encode_text(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        self.text_encodings += 1
        names = self.classnames if classes is None else [self.classnames[i] for i in classes.tolist()]
        names = [c.replace("_", " ") for c in names]
        ids = self.model.tokenize([self.ft_template.format(n) for n in names])
        return self.model.encode_text(ids, normalize=True, batch_size=256)

    def text_features(self) -> torch.Tensor:
        """Normalised class text features (C, E); with grad when the text tower trains (and grad is enabled)."""
        if self.learn_text:
            return self._encode_text()
        key = tuple(self.classnames)
        if key not in self._frozen_text:
            with torch.no_grad():
                self._frozen_text[key] = self._encode_text()
        return self._frozen_text[key]

    skip_plugin = True

    @property
    def backbone(self) -> nn.Module:
        return self.model

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.learn_image and torch.is_grad_enabled()):
            return self.model.encode_image(images, normalize=True)

    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_features(images)  # only called when the image tower is frozen

    def image_is_frozen(self) -> bool:
        return not self.learn_image

    def class_text_features(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        if classes is None or not self.learn_text:
            text = self.text_features()
            return text if classes is None else text[classes.to(text.device)]
        return self._encode_text(classes)

    def eval_text_features(self) -> torch.Tensor:
        return self.text_features()

    def method_record(self) -> dict[str, Any]:
        return {"template": self.ft_template}
