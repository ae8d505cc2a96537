"""DePT: Zhang, Wu, Gao, Shen, Song, *DePT: Decoupled Prompt Tuning*, CVPR 2024 (https://arxiv.org/abs/2309.07439).
Reference: Koorye/DePT ``trainers/elp_{coop,cocoop,kgcoop,maple}.py`` (GPL-2.0: re-implemented from methods.md §9,
no code copied).

Trainable: the base method's parameters, plus (registered as ``dept``) ``film_img`` and ``film_txt`` (per-channel
scale, init 1, and bias, init 0, on the E-dim joint features) and ``head = Linear(E → C_train)`` with bias.

One plugin over any trainer that follows the prompt base's contract (``vltune.tuners.prompting.PromptTrainer``:
``forward_parts(images, text, raw=True) -> SimParts`` with the raw features filled, ``regularizers(batch, parts)``, an
``inference`` that goes through ``forward_parts``).
``with_dept(Base)`` combines ``DePTMixin`` with ``Base``; ``register_dept("Base", *aliases, trainable_params=N)``
registers ``ExtrasLinearProbe<Base>``. With λ = CLS_WEIGHT and 1 − λ = SIM_WEIGHT:

    training   L = (1 − λ)·CE(z_sim, y) + λ·CE(head(cat_batch[FiLM_txt(t_y), FiLM_img(f)]), [y; y]) + regularizers
    inference  z = (1 − λ)·z_sim + λ·head(FiLM_img(f))[:, rows]   where the evaluated classes ⊆ the head's classes
               z = head(FiLM_img(f))[:, rows]                     there, with TEST_TIME_FUSION False (as upstream)
               z = z_sim                                         otherwise

FiLM and the head act on the *raw* encoder outputs f and t, before L2 normalisation (``SimParts.raw_image`` /
``raw_text``), as upstream's ``_forward_logits_linear_probe`` receives them in all four ``elp_*.py``; z_sim and the
base's ``regularizers`` keep the normalised features. The FiLM output is not normalised. ``t_y`` is the raw text
feature of the true class (per image for CoCoOp, whose Meta-Net still reads the normalised f).

Departures from upstream: upstream builds the head only for ``SUBSAMPLE_CLASSES base`` (or ``all`` when "ImageNet"
is in the dataset name) and fuses by dataset name; here the head is always trained on the training classes, stores
their names in the checkpoint, and fusion follows the label-space relation (subsets such as ImageNet-A/R take the
matching rows, in the evaluated order). SkipTuning's ``KgDePT`` never trains FiLM or the head (plain attributes
outside the learnable set); here they are registered, checkpointed and loaded strictly.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

import trainers.cocoop  # noqa: F401  (the bases registered at the bottom, whichever method file imports this first)
import trainers.kgcoop  # noqa: F401
from vltune.registry import TRAINERS
from vltune.tuners.prompting import SimParts, accuracy

logger = logging.getLogger(__name__)
MODULE = "dept"  # the registered module (checkpoint sub-folder) holding FiLM and the head
_UNSET = object()  # no evaluation has decided the fusion rows yet
# The DePT repository's spellings of TRAINER.DEPT keys. A key counts as given where it differs from its default;
# when both spellings are given they must agree.
ALIASES = {"TRAINER.LINEAR_PROBE.WEIGHT": "TRAINER.DEPT.CLS_WEIGHT",
           "TRAINER.LINEAR_PROBE.TEST_TIME_FUSION": "TRAINER.DEPT.TEST_TIME_FUSION",
           "OPTIM.LR_EXP": "TRAINER.DEPT.LR_EXP"}


def add_config(cfg: CN) -> None:
    """``TRAINER.DEPT`` (SkipTuning's node) and the DePT repository's spellings (``ALIASES``)."""
    cfg.TRAINER.DEPT = CN()
    cfg.TRAINER.DEPT.SIM_WEIGHT = 0.3  # 1 − λ: weight of the similarity logits z_sim
    cfg.TRAINER.DEPT.CLS_WEIGHT = 0.7  # λ: weight of the linear head
    cfg.TRAINER.DEPT.LR_EXP = 6.5  # FiLM and head train at OPTIM.LR × LR_EXP (staged LR)
    cfg.TRAINER.DEPT.TEST_TIME_FUSION = True  # fuse the head into the logits where the label space allows
    cfg.TRAINER.LINEAR_PROBE = CN()
    cfg.TRAINER.LINEAR_PROBE.WEIGHT = 0.7  # λ (sets CLS_WEIGHT λ and SIM_WEIGHT 1 − λ)
    cfg.TRAINER.LINEAR_PROBE.TEST_TIME_FUSION = True
    cfg.TRAINER.LINEAR_PROBE.TYPE = "linear"  # the only head DePT ships
    cfg.TRAINER.FILM = CN()
    cfg.TRAINER.FILM.LINEAR_PROBE = True  # FiLM before the head (required)
    cfg.OPTIM.LR_EXP = 6.5


@dataclass(frozen=True)
class Settings:
    sim_weight: float
    cls_weight: float
    lr_exp: float
    fusion: bool


def _get(cfg: CN, key: str) -> Any:
    return functools.reduce(lambda node, k: node[k], key.split("."), cfg)


def _same(a: Any, b: Any) -> bool:
    return math.isclose(a, b) if isinstance(a, float) or isinstance(b, float) else a == b


def resolve_settings(cfg: CN) -> Settings:
    """The effective DePT settings after the aliases; disagreeing spellings fail naming both keys.

    ``LINEAR_PROBE.WEIGHT = λ`` also means SIM_WEIGHT 1 − λ. Without it the two ``TRAINER.DEPT`` weights are
    independent (SkipTuning's cross-dataset KgDePT sets 0.5 / 0.5).
    """
    probe = CN({"TRAINER": CN(), "OPTIM": CN()})
    add_config(probe)
    given = {key: not _same(_get(cfg, key), _get(probe, key)) for key in [*ALIASES, *ALIASES.values()]}
    value = {}
    for alias, key in ALIASES.items():
        a, k = _get(cfg, alias), _get(cfg, key)
        if given[alias] and given[key] and not _same(a, k):
            raise ValueError(f"{key}={k} and {alias}={a} disagree; both spell one DePT setting: set one of them")
        value[key] = a if given[alias] else k
    sim, lam = float(cfg.TRAINER.DEPT.SIM_WEIGHT), float(value["TRAINER.DEPT.CLS_WEIGHT"])
    if given["TRAINER.LINEAR_PROBE.WEIGHT"]:
        if not _same(sim, _get(probe, "TRAINER.DEPT.SIM_WEIGHT")) and not _same(sim, 1 - lam):
            raise ValueError(f"TRAINER.LINEAR_PROBE.WEIGHT={lam} implies TRAINER.DEPT.SIM_WEIGHT={1 - lam:g} "
                             f"(1 − λ) but TRAINER.DEPT.SIM_WEIGHT={sim}: set one of them")
        sim = 1 - lam
    if sim < 0 or lam < 0 or value["TRAINER.DEPT.LR_EXP"] <= 0:
        raise ValueError(f"DePT needs SIM_WEIGHT ({sim}), CLS_WEIGHT ({lam}) >= 0 and LR_EXP > 0 "
                         f"({value['TRAINER.DEPT.LR_EXP']})")
    if cfg.TRAINER.LINEAR_PROBE.TYPE != "linear" or not cfg.TRAINER.FILM.LINEAR_PROBE:
        raise ValueError("TRAINER.LINEAR_PROBE.TYPE must be 'linear' and TRAINER.FILM.LINEAR_PROBE True (the only "
                         f"DePT head), got {cfg.TRAINER.LINEAR_PROBE.TYPE!r} and {cfg.TRAINER.FILM.LINEAR_PROBE}")
    return Settings(sim, lam, float(value["TRAINER.DEPT.LR_EXP"]), bool(value["TRAINER.DEPT.TEST_TIME_FUSION"]))


def _encode(names: list[str]) -> torch.Tensor:
    return torch.tensor(list("\n".join(names).encode("utf-8")), dtype=torch.uint8)


class FiLM(nn.Module):
    """Per-channel affine map ``x · scale + bias`` (identity at init). (…, E) → (…, E)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.bias


class DePTHead(nn.Module):
    """FiLM for both modalities and the linear head over the training classes, whose names it keeps.

    The names are a persistent uint8 buffer (UTF-8, one per line), so they travel in the checkpoint and load with
    ``weights_only=True``; an evaluation on other classes needs them to decide whether the head applies.
    """

    def __init__(self, dim: int, classnames: list[str]) -> None:
        super().__init__()
        self.film_img, self.film_txt = FiLM(dim), FiLM(dim)
        self.head = nn.Linear(dim, len(classnames))
        self.register_buffer("classnames", _encode(classnames))

    def train_logits(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Head logits of the true-class text features and the image features (both raw, unnormalised).
        (B, E), (B, E) → (2B, C_train)."""
        return self.head(torch.cat([self.film_txt(text), self.film_img(image)]))

    def image_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Head logits of raw image features. (B, E) → (B, C_train)."""
        return self.head(self.film_img(image))

    def trained_classnames(self) -> list[str]:
        return bytes(self.classnames.cpu().tolist()).decode("utf-8").split("\n")

    def rows_for(self, classnames: list[str]) -> torch.Tensor | None:
        """The head rows of ``classnames`` in their order, or None when one of them is not a training class.

        A name that occurs k times among the training classes maps its occurrences in order; a subset that drops
        some of them is ambiguous and gets no rows.
        """
        where: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(self.trained_classnames()):
            where[name].append(i)
        seen: Counter[str] = Counter()
        rows = []
        for name in classnames:
            if seen[name] >= len(where.get(name, ())):
                return None
            rows.append(where[name][seen[name]])
            seen[name] += 1
        if any(len(where[n]) > 1 and seen[n] != len(where[n]) for n in seen):
            return None
        return torch.tensor(rows, device=self.head.weight.device)

    def adopt(self, n_classes: int, classnames: torch.Tensor) -> None:
        """Take a checkpoint's class count and names before a strict load (the values come from the load)."""
        w, b = self.head.weight, self.head.bias
        if w.shape[0] != n_classes:
            w.data, b.data = w.data.new_empty(n_classes, w.shape[1]), b.data.new_empty(n_classes)
            self.head.out_features = n_classes
        self.classnames = classnames.detach().to(device=self.classnames.device, dtype=torch.uint8).clone()


class DePTMixin:
    """DePT over a prompt-base trainer; combine with ``with_dept(Base)``, never subclass per base."""

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        self.dept_settings = resolve_settings(cfg)

    def build_clip(self) -> nn.Module:
        clip = super().build_clip()
        self._dept_dim = clip.embed_dim  # the joint-space width E that FiLM and the head act on
        return clip

    def build_model(self) -> None:
        super().build_model()
        self.dept = DePTHead(self._dept_dim, self.classnames)
        self.model.add_module(MODULE, self.dept)
        self.register_model(MODULE, self.dept)
        self._dept_rows: Any = _UNSET
        self._dept_images: list[torch.Tensor] | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()  # a base may declare a narrower set than its registered modules
        held = {id(p) for p in params}
        return params + [p for p in self.dept.parameters() if id(p) not in held]

    def param_groups(self, name: str, module: nn.Module, params: list[nn.Parameter]) -> list[dict[str, Any]] | None:
        """Staged LR: FiLM and head at ``OPTIM.LR × LR_EXP``; the engine's warmup holds every group at its LR."""
        if name == MODULE:
            return [{"params": params, "lr": self.cfg.OPTIM.LR * self.dept_settings.lr_exp}]
        return super().param_groups(name, module, params)

    def load_trainable_state(self, name: str, state_dict: dict[str, torch.Tensor], source: str) -> None:
        # An evaluation on other classes (base → new, cross-dataset) loads a head trained on the checkpoint's
        # classes: take its shape and names first, then the engine's strict key/shape check applies as usual.
        # Training runs keep the strict shape check (the optimizer already holds the head).
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        if name == MODULE and self.eval_only and {"head.weight", "classnames"} <= set(state):
            self.dept.adopt(state["head.weight"].shape[0], state["classnames"])
        super().load_trainable_state(name, state_dict, source)

    def forward_parts(self, images: torch.Tensor, text: torch.Tensor | None = None, raw: bool = True) -> SimParts:
        """The base's parts, always with the raw features (FiLM and the head read them; ``raw`` is ignored)."""
        parts = super().forward_parts(images, text, raw=True)
        if parts.raw_image is None:
            raise RuntimeError(f"{type(self).__name__}: forward_parts(raw=True) must fill SimParts.raw_image (the "
                               "DePT plugin contract)")
        if self._dept_images is not None:  # collecting the raw image features of the base's inference
            self._dept_images.append(parts.raw_image)
        return parts

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``sim``: (1 − λ)·CE(z_sim, y); ``head``: λ·CE of the head on [FiLM_txt(t_y); FiLM_img(f)]; then the base's
        regularisers (KgCoOp's ``kg``, …), each logged and recorded."""
        parts, batch = self.training_parts(batch)
        y = batch["label"]
        raw_text, raw_image = parts.raw_text, parts.raw_image
        if raw_text is None or raw_image is None:
            raise RuntimeError(f"{type(self).__name__}: forward_parts(raw=True) must fill SimParts.raw_image and "
                               "raw_text in training (the DePT plugin contract)")
        rows = torch.arange(len(y), device=y.device)
        text = raw_text[y] if raw_text.dim() == 2 else raw_text[rows, y]  # (B, C, E): each image's own class
        head = self.dept.train_logits(text.to(raw_image.dtype), raw_image)
        w = self.dept_settings
        self.log_metric("acc", accuracy(parts.logits, y))
        self.log_metric("acc_head", accuracy(head[len(y):], y))
        return {"sim": w.sim_weight * F.cross_entropy(parts.logits, y),
                "head": w.cls_weight * F.cross_entropy(head, y.repeat(2)), **self.regularizers(batch, parts)}

    def fusion_rows(self) -> torch.Tensor | None:
        """Head rows for the evaluated classes (``self.classnames``), or None where DePT gives z_sim only."""
        return self.dept.rows_for(self.classnames)

    def before_evaluate(self) -> None:
        super().before_evaluate()
        self._dept_rows = self.fusion_rows()
        if self._dept_rows is None:
            logger.info("DePT: z_sim only, some evaluated classes are not the head's")
        else:
            logger.info("DePT: " + ("z_sim fused with the head" if self.dept_settings.fusion else
                                    "the head's logits only (TEST_TIME_FUSION off)"))

    def after_evaluate(self) -> None:
        super().after_evaluate()
        self._dept_rows = _UNSET

    def inference(self, images: torch.Tensor) -> torch.Tensor:
        """z_sim from the base's own inference, fused with the head where it applies (the head alone there with
        TEST_TIME_FUSION off, as upstream). (B, 3, H, W) → (B, C)."""
        rows = self.fusion_rows() if self._dept_rows is _UNSET else self._dept_rows
        if rows is None:
            return super().inference(images)
        self._dept_images = []
        try:
            z_sim = super().inference(images)
            feats = self._dept_images
        finally:
            self._dept_images = None
        if not feats or sum(len(f) for f in feats) != len(images):
            raise RuntimeError(f"{type(self).__name__}: the base's inference() must compute its image features "
                               "through forward_parts() (the DePT plugin contract)")
        head = self.dept.image_logits(torch.cat(feats))[:, rows].to(z_sim.dtype)
        w = self.dept_settings
        return w.sim_weight * z_sim + w.cls_weight * head if w.fusion else head


def with_dept(base: type) -> type:
    """``ExtrasLinearProbe<Base>``: ``DePTMixin`` combined with ``base`` (no per-base code)."""
    name = f"ExtrasLinearProbe{base.__name__}"
    doc = f"DePT over {base.__name__}: FiLM + linear head on the training classes, fused where the label space allows."
    return type(name, (DePTMixin, base), {"__doc__": doc, "__module__": __name__, "__qualname__": name})


#: why the DePT variants have no cross-dataset and few-shot presets (register_dept's default reasons)
DEPT_NO_PRESET = dict(
    xd="DePT's repository configures base-to-new runs only; its README's cross-dataset and DG numbers come without "
       "their configs (methods.md §9), so there is no cross-dataset yaml for the DePT variants",
    fewshot="DePT reports no all-class few-shot curve: its 4/8/16-shot tables are base-to-new runs "
            "(protocols_and_numbers.md §3)")


def register_dept(base_name: str, *aliases: str, trainable_params: int, presets: dict[str, Any] | None = None,
                  no_preset: dict[str, str] | None = None) -> type:
    """Register the DePT variant of the registered trainer ``base_name`` (one line per method file).

    ``trainable_params``: the count on the tiny test CLIP (E = 64, 10 classes), i.e. the base's + 906.
    ``presets``: the variant's paper presets (``TRAINERS.register``'s); a protocol it leaves out gets the reason in
    ``no_preset``, else ``DEPT_NO_PRESET``'s. The base's presets, reasons and ``eval_only`` are not inherited.
    """
    base = TRAINERS.get(base_name)
    meta = TRAINERS.meta(base_name)
    cls = with_dept(base)
    overrides = {**(meta.get("test_overrides") or {}), "trainable_params": trainable_params}
    own = ("add_config", "test_overrides", "presets", "no_preset", "eval_only")
    inherited = {k: v for k, v in meta.items() if k not in own}  # family, per-dataset
    if presets is not None:
        reasons = {**DEPT_NO_PRESET, **(no_preset or {})}
        inherited.update(presets=presets, no_preset={p: r for p, r in reasons.items() if p not in presets})
    elif no_preset is not None:
        inherited.update(no_preset=no_preset)
    TRAINERS.register(cls.__name__, cls, aliases=aliases, **inherited, add_config=add_config, test_overrides=overrides)
    return cls


register_dept("CoOp", trainable_params=1930, presets=dict(b2n="vit_b16_ep10_bs4_lr35"))
register_dept("CoCoOp", trainable_params=2510, presets=dict(b2n="vit_b16_c4_ep10_batch1_ctxv1"))
register_dept("KgCoOp", "KgDePT", trainable_params=1930, presets=dict(b2n="vit_b16_ep10_ctxv1_bs4_lr35"))
