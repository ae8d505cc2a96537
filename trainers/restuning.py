"""The Res-Tuning family on CLIP: Jiang, Mao, Huang, Ma, Lv, Shen, Zhao, Zhou, *Res-Tuning: A Flexible and Efficient
Tuning Paradigm via Unbinding Tuner from Backbone*, NeurIPS 2023 (https://arxiv.org/abs/2310.19859). The only public
code (modelscope/ms-swift ``swift/tuners/restuning.py``) implements the bypass only; this is vltune's own CLIP wiring
(methods.md §14.5–14.7), with the tuners of ``vltune.tuners.res_tuners``.

Trainable: the tuners of the towers in ``TRAINER.RESTUNING.TOWERS`` (default the image tower), registered as
``restuning``; CLIP is frozen. Classifier: the zero-shot text features of the dataset template (computed once per
class set) unless the text tower is tuned too. L = CE(τ · f · Tᵀ, y).

* ``ResAdapter``: ``x + attn(h) [+ A(h)]`` and ``x + mlp(h) + A(h)`` inside every block (``ADAPTER_AT``: parallel to
  the MLP and/or the attention), A a rank-``RANK`` bottleneck whose last layer starts at 0.
* ``ResPrefix`` / ``ResPrompt``: a parallel attention branch ``softmax(Q Kᵀ/√d_h) V`` in every block, with the
  frozen ``W_q`` and output weight, over ``N_TOKENS`` trainable keys/values (prefix; no gate: the values start at 0)
  or prompt tokens P with ``K, V = ln_1(P) W_k, W_v`` from the block's frozen weights (prompt). Res-Prompt's branch is
  multiplied by a per-channel gate that starts at 0 (vltune's addition, so that it starts at 0); ``PROMPT_GATE``
  False is the paper's ungated branch, which changes the features from step 0.
* ``ResTuningBypass``: the frozen tower runs under ``no_grad``; a side chain of ``LATERAL``/``VERTICAL`` tuners over
  its block outputs (``RECURRENCE`` identity: ``d_{i+1} = λ·H_i(s_i) + (1 − λ)·V_i(d_i)``, added to the last block's
  output; ``paper``/``swift`` replace it) feeds the frozen head. All tuners act per token and the head reads one
  token (CLS / EOT), so the chain runs on that token only: the same result as on every token, at a fraction of the
  cost. A tuned text tower with fixed prompts caches its block outputs once per class set.

Every variant starts as exactly the frozen CLIP (zero-initialised last layers and gates), except the ``paper`` and
``swift`` bypass recurrences, which replace the features (as swift does), and the ungated Res-Prompt
(``PROMPT_GATE`` False). With ``RECURRENCE`` identity the bypass equals frozen CLIP at step 0 for every accepted
``LATERAL``/``VERTICAL`` pair; the two settings that cannot (``LATERAL`` identity, and ``res_prompt`` with
``PROMPT_GATE`` False) are refused by ``check_cfg``. Checkpoints hold the tuners only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from vltune.clip.backbone import BlockHooks
from vltune.registry import TRAINERS
from vltune.tuners.prompting import PromptTrainer
from vltune.tuners.res_tuners import RECURRENCES, TUNERS, BypassChain, FrozenAttention, build_tuner, identity_problem

TOWERS = ("image", "text")


def add_config(cfg: CN) -> None:
    """``TRAINER.RESTUNING`` (shared by the four Res-Tuning trainers; the variant is the trainer)."""
    cfg.TRAINER.RESTUNING = CN()
    cfg.TRAINER.RESTUNING.TOWERS = ("image",)  # image | text | both
    cfg.TRAINER.RESTUNING.RANK = 8  # bottleneck width r of res_adapter tuners
    cfg.TRAINER.RESTUNING.N_TOKENS = 10  # prefix / prompt length
    cfg.TRAINER.RESTUNING.ADAPTER_AT = ("mlp",)  # ResAdapter: parallel to mlp and/or attn
    # bypass lateral tuner (on block i's output): res_adapter | res_prefix | res_prompt | zero; identity only with
    # RECURRENCE paper/swift (with identity it would add the block's own output to the features)
    cfg.TRAINER.RESTUNING.LATERAL = "res_adapter"
    # bypass vertical tuner (on the chain state): res_adapter | res_prefix | res_prompt | zero | identity
    cfg.TRAINER.RESTUNING.VERTICAL = "res_adapter"
    cfg.TRAINER.RESTUNING.RECURRENCE = "identity"  # identity (exact frozen CLIP at init) | paper | swift
    # Res-Prompt branch times a per-channel gate that starts at 0 (vltune's addition: exactly frozen CLIP at init);
    # False: the paper's ungated branch (not frozen CLIP at init; refused in a bypass with RECURRENCE identity)
    cfg.TRAINER.RESTUNING.PROMPT_GATE = True
    cfg.TRAINER.RESTUNING.LAMBDA = 0.5  # λ of the bypass recurrence (identity, paper)
    cfg.TRAINER.RESTUNING.LEARN_LAMBDA = False  # λ = sigmoid(learnable scalar), 0.5 at init
    cfg.TRAINER.RESTUNING.PREC = ""  # fp16 | amp | fp32; empty: TRAINER.PREC


def _spec(name: str, c: CN) -> dict | str:
    """The ``build_tuner`` spec of tuner ``name`` under ``TRAINER.RESTUNING``."""
    if name == "res_adapter":
        return {name: {"adapter_length": int(c.RANK)}}
    if name == "res_prefix":
        return {name: {"n_tokens": int(c.N_TOKENS)}}
    if name == "res_prompt":
        return {name: {"n_tokens": int(c.N_TOKENS), "gate": bool(c.PROMPT_GATE)}}
    return name


class ResHooks(BlockHooks):
    """Adds the in-block branches of ``tuners`` (``{tower: {"attn"|"mlp": ModuleList}}``) parallel to each op."""

    branches = True

    def __init__(self, tuners: nn.ModuleDict) -> None:
        self.tuners = tuners

    def _branch(self, tower: str, kind: str, i: int, h: torch.Tensor) -> torch.Tensor | None:
        per_tower = self.tuners[tower] if tower in self.tuners else None
        if per_tower is None or kind not in per_tower:
            return None
        return per_tower[kind][i](h)

    def attn_branch(self, tower: str, i: int, h: torch.Tensor) -> torch.Tensor | None:
        return self._branch(tower, "attn", i, h)

    def mlp_branch(self, tower: str, i: int, h: torch.Tensor) -> torch.Tensor | None:
        return self._branch(tower, "mlp", i, h)


class ResTuningTrainer(PromptTrainer):
    """Frozen CLIP plus Res-Tuning tuners; a subclass names its ``variant``."""

    config_node = "RESTUNING"
    variant = ""  # adapter | prefix | prompt | bypass

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        c = cfg.TRAINER.RESTUNING
        checks = [("TOWERS", c.TOWERS, TOWERS), ("ADAPTER_AT", c.ADAPTER_AT, ("attn", "mlp")),
                  ("LATERAL", [c.LATERAL], TUNERS), ("VERTICAL", [c.VERTICAL], TUNERS),
                  ("RECURRENCE", [c.RECURRENCE], RECURRENCES)]
        for key, values, valid in checks:
            bad = [v for v in values if v not in valid]
            if bad or not values:
                raise ValueError(f"TRAINER.RESTUNING.{key} {list(values)}: choose from {', '.join(valid)}")
        if c.RANK < 1 or c.N_TOKENS < 1:
            raise ValueError(f"TRAINER.RESTUNING.RANK and N_TOKENS must be >= 1, got {c.RANK} and {c.N_TOKENS}")
        if not 0.0 <= c.LAMBDA <= 1.0:
            raise ValueError(f"TRAINER.RESTUNING.LAMBDA must be in [0, 1], got {c.LAMBDA}")
        if not isinstance(c.PROMPT_GATE, bool):
            raise ValueError(f"TRAINER.RESTUNING.PROMPT_GATE must be True or False, got {c.PROMPT_GATE!r}")
        if self.variant == "bypass" and c.RECURRENCE == "identity":
            for key in ("LATERAL", "VERTICAL"):
                problem = identity_problem(_spec(c[key], c), key.lower())
                if problem:
                    fix = ("set TRAINER.RESTUNING.PROMPT_GATE True" if c[key] == "res_prompt" else
                           f"choose {key} from {', '.join(n for n in TUNERS if not identity_problem(n, key.lower()))}")
                    raise ValueError(f"TRAINER.RESTUNING.{key} {c[key]!r} (PROMPT_GATE {c.PROMPT_GATE}) is refused "
                                     f"with RECURRENCE identity: {problem}. To keep the identity recurrence, {fix}; "
                                     "or set RECURRENCE paper/swift (not frozen CLIP at init)")

    def build_model(self) -> None:
        c = self.cfg.TRAINER.RESTUNING
        clip = self.build_clip()
        tuners = nn.ModuleDict({tower: self._tower_tuners(clip, tower, c) for tower in c.TOWERS})
        self.model = nn.ModuleDict({"clip": clip, "tuners": tuners})
        self.register_model("restuning", tuners)
        self.hooks = ResHooks(tuners) if self.variant != "bypass" else None
        self._text_stems: tuple[tuple[str, ...], torch.Tensor, torch.Tensor] | None = None

    @property
    def backbone(self) -> nn.Module:
        return self.model["clip"]

    def _tower_tuners(self, clip: nn.Module, tower: str, c: CN) -> nn.Module:
        blocks = clip.blocks(tower)
        dim = clip.width_text if tower == "text" else clip.width_image
        where = f"TRAINER.RESTUNING ({tower} tower)"

        def tuner(name: str, block: nn.Module, residual: bool) -> nn.Module:
            return build_tuner(_spec(name, c), dim, residual=residual, zero_init=True,
                               attn=FrozenAttention(block.attn), norm=block.ln_1, where=where)

        if self.variant == "bypass":
            residual = c.RECURRENCE != "identity"
            return BypassChain([tuner(c.LATERAL, b, residual) for b in blocks],
                               [tuner(c.VERTICAL, b, residual) for b in blocks], recurrence=c.RECURRENCE,
                               lam="learnable" if c.LEARN_LAMBDA else float(c.LAMBDA))
        if self.variant == "adapter":
            return nn.ModuleDict({at: nn.ModuleList(tuner("res_adapter", b, False) for b in blocks)
                                  for at in c.ADAPTER_AT})
        name = {"prefix": "res_prefix", "prompt": "res_prompt"}[self.variant]
        return nn.ModuleDict({"attn": nn.ModuleList(tuner(name, b, False) for b in blocks)})

    # ---- bypass -----------------------------------------------------------------------------------------------
    def _bypass_head_input(self, chain: BypassChain, root: torch.Tensor, stems: list[torch.Tensor]) -> torch.Tensor:
        out = chain(root, stems)
        return stems[-1] + out if chain.adds else out

    def _image_bypass(self, images: torch.Tensor) -> torch.Tensor:
        clip = self.backbone
        pooled_by_cls = clip.pools_cls_token
        with torch.no_grad():  # the backbone never enters the autograd graph
            x = clip.embed_image(images)
            keep = slice(0, 1) if pooled_by_cls else slice(None)  # per-token tuners: the head reads CLS only
            root, stems = x[:, keep], []
            for i in range(clip.n_layers_image):
                x = clip.image_blocks(x, i, i + 1)
                stems.append(x[:, keep])
        return clip.image_head(self._bypass_head_input(self.model["tuners"]["image"], root, stems))

    def _text_bypass(self, classes: torch.Tensor | None) -> torch.Tensor:
        """Text features through the bypass; the frozen tower's EOT-token block outputs are cached per class set."""
        clip, key = self.backbone, tuple(self.classnames)
        if self._text_stems is None or self._text_stems[0] != key:
            with torch.no_grad():
                ids = clip.tokenize([self.template.format(n.replace("_", " ")) for n in self.classnames])
                eot = clip.eot_index(ids)
                x = clip.embed_text(clip.cut_text(ids, eot))
                rows = torch.arange(len(eot), device=x.device)
                states = [x[rows, eot]]
                for i in range(clip.n_layers_text):
                    x = clip.text_blocks(x, i, i + 1)
                    states.append(x[rows, eot])
            self._text_stems = (key, torch.stack(states[:1]), torch.stack(states[1:]))
        _, root, stems = self._text_stems
        if classes is not None:
            root, stems = root[:, classes], stems[:, classes]
        x = self._bypass_head_input(self.model["tuners"]["text"], root[0][:, None], [s[:, None] for s in stems])
        return clip.text_head(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))

    # ---- the contract -----------------------------------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if "image" not in self.cfg.TRAINER.RESTUNING.TOWERS:
            with torch.no_grad():
                return self.backbone.encode_image(images, normalize=True)
        if self.variant == "bypass":
            return F.normalize(self._image_bypass(images), dim=-1)
        return self.backbone.encode_image(images, hooks=self.hooks, normalize=True)

    def class_text_features(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        clip = self.backbone
        if "text" not in self.cfg.TRAINER.RESTUNING.TOWERS:
            weights = self.teacher("zero_shot")
            return weights if classes is None else weights[classes]
        if self.variant == "bypass":
            return F.normalize(self._text_bypass(classes), dim=-1)
        names = self.classnames if classes is None else [self.classnames[i] for i in classes.tolist()]
        ids = clip.tokenize([self.template.format(n.replace("_", " ")) for n in names])
        return clip.encode_text(ids, normalize=True, hooks=self.hooks, batch_size=256)

    def build_teachers(self) -> None:
        """The frozen text tower's zero-shot class features, when no tuner acts on the text tower."""
        if "text" not in self.cfg.TRAINER.RESTUNING.TOWERS:
            self.teachers["zero_shot"] = self.backbone.zero_shot_classifier(self.classnames, [self.template])


_PRESETS = dict(b2n="vit_b16_b2n", xd="vit_b16_cross_datasets", fewshot="vit_b16_few_shot")  # all four variants


@TRAINERS.register("ResAdapter", add_config=add_config, family="restuning", presets=_PRESETS,
                   test_overrides=dict(trainable_params=2 * (64 * 8 + 8 + 8 * 64 + 64)))
class ResAdapter(ResTuningTrainer):
    """Res-Adapter: bottleneck adapters parallel to the frozen MLP (and/or attention) of every block."""

    variant = "adapter"


@TRAINERS.register("ResPrefix", add_config=add_config, family="restuning", presets=_PRESETS,
                   test_overrides=dict(trainable_params=2 * 2 * 10 * 64))
class ResPrefix(ResTuningTrainer):
    """Res-Prefix: a parallel attention over trainable keys and values in every block, ungated (the values start at
    0, so the branch starts at 0)."""

    variant = "prefix"


@TRAINERS.register("ResPrompt", add_config=add_config, family="restuning", presets=_PRESETS,
                   test_overrides=dict(trainable_params=2 * (10 * 64 + 64)))
class ResPrompt(ResTuningTrainer):
    """Res-Prompt: a parallel attention over trainable prompt tokens projected by the frozen K/V weights, times a
    per-channel gate that starts at 0 (vltune's addition); ``PROMPT_GATE`` False drops the gate (the paper's form,
    not frozen CLIP at init)."""

    variant = "prompt"


@TRAINERS.register("ResTuningBypass", add_config=add_config, family="restuning", presets=_PRESETS,
                   test_overrides=dict(trainable_params=2 * 2 * (64 * 8 + 8 + 8 * 64 + 64)))
class ResTuningBypass(ResTuningTrainer):
    """Res-Tuning-Bypass: a side chain of tuners over detached block outputs; the backbone runs without autograd."""

    variant = "bypass"
