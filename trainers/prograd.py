"""ProGrad: Zhu, Niu, Han, Wu, Zhang, *Prompt-aligned Gradient for Prompt Tuning*, ICCV 2023
(https://arxiv.org/abs/2205.14865). Reference: BeierZhu/Prompt-align ``ProGrad.public/trainers/prograd.py`` and
``prograd_backward_and_update`` in its Dassl fork (``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``).

Trainable: CoOp's context vectors ``ctx`` (M × D; 16 × 512 = 8,192 in the official configs, 4 × 512 = 2,048 in
SkipTuning's), registered as ``prompt_learner``.

Student s = CoOp's logits; teacher z = zero-shot CLIP logits with ProGrad's hand-crafted template, no grad::

    L_ce = CE(s, y)      L_kl = T² · mean_i Σ_c softmax(z_i/T)_c · (−log softmax(s_i/T)_c)   (KL up to a constant)

``LOSS.NAME`` picks the update, for one optimizer step per batch:

* ``prograd`` (default; also ""): per trainable tensor, g = g_ce − λ·⟨g_ce, g_kl⟩/‖g_kl‖²·g_kl when ⟨g_ce, g_kl⟩ < 0,
  else g = g_ce. λ = 1 removes the part of g_ce that conflicts with the zero-shot direction, λ = 0 is CoOp's
  update, and the official README uses λ = 0.8 for 8/16 shots on Flowers102, DTD and EuroSAT.
* ``vertical_grad``: the same projection whatever the sign of ⟨g_ce, g_kl⟩ (an ablation in the reference code).
* ``kd``: (1 − α)·L_ce + α·L_kl with an ordinary backward.

Departures from upstream: no second CLIP for the teacher: the image path is frozen, so the student's image features
are the zero-shot ones and z = τ f Wᵀ with W the hand-crafted class features computed once (fp32); the projection
runs over the declared trainable set inside this trainer, and a tensor without a gradient or a zero g_kl is left
alone (upstream normalises every parameter's gradient and divides by zero); the ``amp`` path runs the projection
too (upstream passes the loss tuple to the GradScaler and crashes); the template-phrase initialisation counts BPE
tokens, not words (upstream misaligns "pet," and friends).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from trainers.coop import CoOp
from vltune.registry import TRAINERS
from vltune.tuners.prompting import SimParts, accuracy

LOSSES = ("prograd", "kd", "vertical_grad")

#: ProGrad's hand-crafted templates where they differ from the dataset's own (CoOp's CUSTOM_TEMPLATES), keyed by
#: ``DATASET.NAME`` (upstream ``CUSTOM_TEMPLATES`` in ProGrad.public/trainers/prograd.py). They serve the teacher
#: and ``TRAINER.PROGRAD.TEMPLATE_INIT``; every other dataset uses its own template.
PROGRAD_TEMPLATES = {
    "OxfordPets": "a type of pet, a photo of a {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.",
    "DescribableTextures": "a texture of {}.",
    "Food101": "a type of food, a photo of {}.",
}


def add_config(cfg: CN) -> None:
    """``LOSS`` (the official ProGrad node, defaults as upstream's train.py) and ``TRAINER.PROGRAD``.

    The context keys (N_CTX, CSC, CTX_INIT, CLASS_TOKEN_POSITION, PREC) are CoOp's, in ``TRAINER.COOP``.
    """
    cfg.LOSS = CN()
    cfg.LOSS.NAME = ""  # prograd (also "") | kd | vertical_grad
    cfg.LOSS.T = 1.0  # distillation temperature T (> 0)
    cfg.LOSS.LAMBDA = 1.0  # projection strength λ of prograd / vertical_grad (1: full projection, 0: CoOp)
    cfg.LOSS.ALPHA = 0.0  # weight α of L_kl in kd: (1 − α)·L_ce + α·L_kl
    cfg.LOSS.GM = False  # declared by the Skip Tuning repo's config, so its yaml files merge; no method reads it
    cfg.TRAINER.PROGRAD = CN()
    # official CTX_INIT True: ctx = the template without " {}." (e.g. "a photo of a"), right-aligned in the N_CTX
    # slots after zero vectors; needs TRAINER.COOP.CTX_INIT "" and CSC False
    cfg.TRAINER.PROGRAD.TEMPLATE_INIT = False


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · mean_i Σ_c softmax(z_i/T)_c · (−log softmax(s_i/T)_c). Input: logits (B, C), (B, C). Output: scalar."""
    target = F.softmax(teacher.float() / temperature, dim=-1)
    log_prob = F.log_softmax(student.float() / temperature, dim=-1)
    return -(target * log_prob).sum(dim=-1).mean() * temperature**2


def project_gradient(g_ce: torch.Tensor, g_kl: torch.Tensor | None, lam: float, always: bool = False) -> torch.Tensor:
    """ProGrad's update direction for one parameter tensor (any shape; g_kl the same shape or None).

    g_ce − λ·⟨g_ce, g_kl⟩/‖g_kl‖²·g_kl where ⟨g_ce, g_kl⟩ < 0 (or ``always``), else g_ce. A zero or missing g_kl
    gives g_ce. Non-finite inputs stay non-finite, so a GradScaler still sees the overflow and skips the step.
    """
    if g_kl is None:
        return g_ce
    dot, norm_sq = (g_ce * g_kl).sum(), (g_kl * g_kl).sum()
    conflict = norm_sq > 0 if always else (dot < 0) & (norm_sq > 0)
    coef = torch.where(conflict, lam * dot / torch.where(norm_sq > 0, norm_sq, 1.0), 0.0)
    return g_ce - coef * g_kl


@TRAINERS.register("ProGrad", add_config=add_config, family="prompt", test_overrides=dict(trainable_params=16 * 64),
                   presets=dict(b2n="vit_b16_ep100_ctx", xd="vit_b16_ep100_ctx"),
                   no_preset=dict(fewshot="ProGrad's official few-shot runs use RN50 (configs/trainers/ProGrad/"
                                  "rn50*.yaml: CoOp's 50/100/200-epoch schedule, λ 0.8 at 8/16 shots on Flowers102, "
                                  "DTD and EuroSAT; methods.md §4); there is no ViT-B/16 few-shot config for it"))
class ProGrad(CoOp):
    """CoOp whose update never conflicts with the zero-shot teacher's gradient (or KD with ``LOSS.NAME kd``)."""

    def check_cfg(self, cfg: CN) -> None:
        super().check_cfg(cfg)
        name = cfg.LOSS.NAME or "prograd"
        if name not in LOSSES:
            raise ValueError(f"LOSS.NAME {cfg.LOSS.NAME!r}: choose from {LOSSES} ('' means prograd)")
        if cfg.LOSS.T <= 0:
            raise ValueError(f"LOSS.T must be > 0, got {cfg.LOSS.T}")
        if cfg.TRAINER.PROGRAD.TEMPLATE_INIT and (cfg.TRAINER.COOP.CTX_INIT or cfg.TRAINER.COOP.CSC):
            raise ValueError("TRAINER.PROGRAD.TEMPLATE_INIT replaces TRAINER.COOP.CTX_INIT and needs a generic "
                             "context: set TRAINER.COOP.CTX_INIT '' and TRAINER.COOP.CSC False")

    def build_model(self) -> None:
        super().build_model()
        loss = self.cfg.LOSS
        self.loss_name = loss.NAME or "prograd"
        self.temperature, self.lam, self.alpha = float(loss.T), float(loss.LAMBDA), float(loss.ALPHA)
        self.prograd_template = PROGRAD_TEMPLATES.get(self.cfg.DATASET.NAME, self.template)
        if self.cfg.TRAINER.PROGRAD.TEMPLATE_INIT:
            self._init_ctx_from_template()

    def build_teachers(self) -> None:
        """The teacher's normalised zero-shot class features of ProGrad's template, (C, E); training only."""
        if not self.eval_only:
            self.teachers["zero_shot"] = self.frozen_class_features([self.prograd_template])

    def _init_ctx_from_template(self) -> None:
        template, pl, clip = self.prograd_template, self.model.prompt_learner, self.model.clip
        if not template.endswith(" {}."):
            raise ValueError(f"TRAINER.PROGRAD.TEMPLATE_INIT needs a template ending in ' {{}}.', got {template!r} "
                             f"({self.cfg.DATASET.NAME}); set TRAINER.COOP.CTX_INIT to a phrase instead")
        ids = clip.tokenize([template[: -len(" {}.")]])
        n = int(clip.eot_index(ids)[0]) - 1
        if n > pl.n_ctx:
            raise ValueError(f"the template phrase of {template!r} has {n} tokens but TRAINER.COOP.N_CTX is "
                             f"{pl.n_ctx}; raise N_CTX")
        with torch.no_grad():
            pl.ctx.zero_()
            pl.ctx[pl.n_ctx - n:] = clip.token_embedding(ids)[0, 1:1 + n]

    @torch.no_grad()
    def teacher_logits(self, parts: SimParts) -> torch.Tensor:
        """Zero-shot CLIP logits (B, C): the student's (frozen) image features times the teacher's class features."""
        return self.similarity(parts.image, self.teacher("zero_shot"))

    def prograd_losses(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, SimParts]:
        """L_ce and L_kl on a batch, unweighted, with the student's parts."""
        parts = self.forward_parts(batch["img"])
        ce = F.cross_entropy(parts.logits, batch["label"])
        kl = distill_loss(parts.logits, self.teacher_logits(parts), self.temperature)
        return ce, kl, parts

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """kd: ``{"ce": (1 − α)·L_ce, "kl": α·L_kl}``, the objective. prograd/vertical_grad: ``{"ce": L_ce}``, the
        objective whose gradient ``forward_backward`` projects; L_kl, the direction it projects against, is logged as
        ``loss_kl``."""
        ce, kl, parts = self.prograd_losses(batch)
        self.log_metric("acc", accuracy(parts.logits, batch["label"]))
        if self.loss_name == "kd":
            return {"ce": (1 - self.alpha) * ce, "kl": self.alpha * kl}
        self.log_metric("loss_kl", float(kl.detach()))
        return {"ce": ce}

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        # Overridden because ProGrad changes the update itself: two gradients (L_kl's and L_ce's) are combined per
        # tensor before the one optimizer step. kd is an ordinary loss and takes the engine's path.
        if self.loss_name == "kd":
            return super().forward_backward(batch)
        with self.precision.autocast():
            ce, kl, parts = self.prograd_losses(batch)
        if not (torch.isfinite(ce) and torch.isfinite(kl)):
            raise FloatingPointError("Loss is infinite or NaN!")
        params = [p for p in self.trainable_parameters() if p.requires_grad]
        # Both losses are scaled the way the engine scales its backward (GradScaler under CUDA fp16/amp). The scale
        # is a power of two shared by both, and the projection is linear in g_ce and invariant to the scale of g_kl,
        # so projecting the scaled gradients and letting step_optimizers unscale them is bit-identical to unscaling
        # first (which step_optimizers would then repeat: GradScaler allows one unscale_ per step).
        g_kl = torch.autograd.grad(self._scaled(kl), params, retain_graph=True, allow_unused=True)
        g_ce = torch.autograd.grad(self._scaled(ce), params, allow_unused=True)
        always = self.loss_name == "vertical_grad"
        for p, a, b in zip(params, g_ce, g_kl):
            p.grad = None if a is None else project_gradient(a, b, self.lam, always)
        self.step_optimizers()  # unscale, clip (OPTIM.MAX_GRAD_NORM), step, scaler update: the engine's own
        return {"loss": float(ce.detach()), "loss_ce": float(ce.detach()), "loss_kl": float(kl.detach()),
                "acc": accuracy(parts.logits, batch["label"])}

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        scaler = self.precision.scaler
        return scaler.scale(loss) if scaler is not None else loss
