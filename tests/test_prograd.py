"""ProGrad: the per-tensor gradient projection, its place in the engine's update (one step, clipping, GradScaler),
the zero-shot teacher, the kd loss and the official template initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.prograd import distill_loss, project_gradient

PROGRAD = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "DATALOADER.TEST.BATCH_SIZE": 8,
           "OPTIM.NAME": "sgd", "OPTIM.LR": 1.0, "OPTIM.MOMENTUM": 0.0, "OPTIM.WEIGHT_DECAY": 0.0,
           "OPTIM.MAX_EPOCH": 1, "OPTIM.LR_SCHEDULER": "constant", "SEED": 1, "TRAINER.COOP.CTX_INIT": "a photo of a"}


def _batch(trainer):
    return trainer.to_device(next(iter(trainer.train_loader_x)))


def _gradients(trainer, batch):
    """(g_ce, g_kl) of the context on ``batch``, computed independently of the trainer's update."""
    ce, kl, _ = trainer.prograd_losses(batch)
    ctx = trainer.model.prompt_learner.ctx
    return torch.autograd.grad(ce, ctx, retain_graph=True)[0], torch.autograd.grad(kl, ctx)[0]


def _step(trainer, batch):
    """One forward_backward; returns the context's change."""
    ctx = trainer.model.prompt_learner.ctx
    before = ctx.detach().clone()
    trainer.set_model_mode("train")
    trainer.forward_backward(batch)
    return ctx.detach() - before


def _teacher(trainer, labels: torch.Tensor, sign: float) -> None:
    """Replace the zero-shot teacher by one that agrees with ``labels`` (sign +1) or contradicts them (−1).

    The contradicting teacher is sure of the student's strongest wrong class c*: the logit-space gradients
    p − e_y (CE) and p − e_c* (KL) then have ⟨·,·⟩ = ‖p‖² − p_y − p_c* < 0 for every sample.
    """
    def teacher_logits(parts):
        if sign > 0:
            return 20.0 * F.one_hot(labels, trainer.num_classes).float()
        wrong = parts.logits.detach().scatter(1, labels[:, None], float("-inf")).argmax(dim=1)
        return 20.0 * F.one_hot(wrong, trainer.num_classes).float()
    trainer.teacher_logits = teacher_logits


# ---- the projection itself ------------------------------------------------------------------------------------------
def test_a_conflicting_gradient_is_projected_onto_the_normal_plane_of_the_kl_gradient():
    g_ce, g_kl = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    assert torch.dot(g_ce, g_kl) < 0
    g = project_gradient(g_ce, g_kl, 1.0)
    torch.testing.assert_close(g, torch.tensor([0.5, 0.5]))
    assert torch.dot(g, g_kl) >= 0


def test_a_non_conflicting_gradient_is_kept():
    g_ce, g_kl = torch.randn(4, 8), torch.randn(4, 8)
    g_kl = torch.where(torch.sum(g_ce * g_kl) >= 0, g_kl, -g_kl)
    assert torch.equal(project_gradient(g_ce, g_kl, 1.0), g_ce)
    assert torch.equal(project_gradient(g_ce, torch.zeros_like(g_ce), 1.0), g_ce)  # no direction to protect
    assert torch.equal(project_gradient(g_ce, None, 1.0), g_ce)


def test_lambda_scales_the_removed_component_and_zero_is_coops_gradient():
    g_ce, g_kl = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 1.0, 0.0])
    dot = torch.dot(g_ce, g_kl)
    assert torch.equal(project_gradient(g_ce, g_kl, 0.0), g_ce)
    for lam in (0.5, 0.8, 1.0):  # the conflict left over is (1 − λ)·⟨g_ce, g_kl⟩
        torch.testing.assert_close(torch.dot(project_gradient(g_ce, g_kl, lam), g_kl), (1 - lam) * dot)


def test_vertical_grad_projects_even_without_a_conflict():
    g_ce, g_kl = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])
    assert torch.equal(project_gradient(g_ce, g_kl, 1.0), g_ce)
    torch.testing.assert_close(project_gradient(g_ce, g_kl, 1.0, always=True), torch.tensor([0.0, 1.0]))


def test_a_non_finite_gradient_stays_non_finite_so_the_grad_scaler_skips_the_step():
    g = project_gradient(torch.tensor([float("inf"), -1.0]), torch.tensor([1.0, 1.0]), 1.0)
    assert not torch.isfinite(g).all()


# ---- inside the trainer ---------------------------------------------------------------------------------------------
@pytest.fixture
def conflicting(make_trainer):
    """A trainer whose teacher disagrees with the labels, and a batch on which CE and KL gradients conflict."""
    trainer = make_trainer("ProGrad", opts=PROGRAD)
    batch = _batch(trainer)
    _teacher(trainer, batch["label"], -1.0)
    return trainer, batch


def test_the_update_never_conflicts_with_the_zero_shot_direction(conflicting):
    trainer, batch = conflicting
    g_ce, g_kl = _gradients(trainer, batch)
    assert torch.sum(g_ce * g_kl) < 0  # the constructed conflict
    step = _step(trainer, batch)
    g = trainer.model.prompt_learner.ctx.grad
    for p in trainer.trainable_parameters():  # every trainable tensor (here: ctx)
        assert torch.sum(p.grad * g_kl) >= -1e-6 * g_ce.norm() * g_kl.norm()
    torch.testing.assert_close(g, project_gradient(g_ce, g_kl, 1.0))
    assert not torch.allclose(g, g_ce)
    torch.testing.assert_close(step, -g)  # SGD, lr 1, no momentum: the step is the projected gradient


def test_without_a_conflict_the_update_is_the_ce_gradient(make_trainer):
    trainer = make_trainer("ProGrad", opts=PROGRAD)
    batch = _batch(trainer)
    _teacher(trainer, batch["label"], +1.0)
    g_ce, g_kl = _gradients(trainer, batch)
    assert torch.sum(g_ce * g_kl) >= 0
    step = _step(trainer, batch)
    torch.testing.assert_close(trainer.model.prompt_learner.ctx.grad, g_ce, rtol=0, atol=0)
    torch.testing.assert_close(step, -g_ce)


def test_lambda_zero_updates_exactly_like_coop(make_trainer):
    coop = make_trainer("CoOp", opts=PROGRAD)
    batch = _batch(coop)
    prograd = make_trainer("ProGrad", opts=PROGRAD, **{"LOSS.LAMBDA": 0.0})
    _teacher(prograd, batch["label"], -1.0)
    g_ce, g_kl = _gradients(prograd, batch)
    assert torch.sum(g_ce * g_kl) < 0
    torch.testing.assert_close(_step(prograd, batch), _step(coop, batch), rtol=0, atol=0)


def test_one_optimizer_step_per_batch(monkeypatch, make_trainer):
    trainer = make_trainer("ProGrad", opts=PROGRAD)
    optim, calls = trainer._optims["prompt_learner"], []
    step = optim.step
    monkeypatch.setattr(optim, "step", lambda *a, **k: (calls.append(1), step(*a, **k))[1])
    trainer.set_model_mode("train")
    batches = iter(trainer.train_loader_x)
    for _ in range(3):
        trainer.forward_backward(trainer.to_device(next(batches)))
    assert len(calls) == 3


def test_grad_scaler_and_clipping_go_through_the_engine(make_trainer):
    plain = make_trainer("ProGrad", opts=PROGRAD)
    batch = _batch(plain)
    _teacher(plain, batch["label"], -1.0)  # a conflict, so the projection is part of what is compared
    expected = _step(plain, batch)
    scaled = make_trainer("ProGrad", opts=PROGRAD)
    _teacher(scaled, batch["label"], -1.0)
    # CUDA fp16/amp's GradScaler, on CPU: the gradients arrive multiplied by 2**12 and the engine unscales them
    scaled.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    torch.testing.assert_close(_step(scaled, batch), expected, rtol=0, atol=0)
    assert scaled.precision.scaler.get_scale() == 2.0**12  # finite gradients: no skipped step, no back-off

    clipped = make_trainer("ProGrad", opts=PROGRAD, **{"OPTIM.MAX_GRAD_NORM": 1e-3})
    _teacher(clipped, batch["label"], -1.0)
    step = _step(clipped, batch)
    assert float(step.norm()) == pytest.approx(1e-3, rel=1e-3)
    torch.testing.assert_close(step / step.norm(), expected / expected.norm())  # the projected direction, clipped


# ---- teacher and losses ---------------------------------------------------------------------------------------------
def test_the_teacher_is_zero_shot_clip_with_the_dataset_template(make_trainer):
    trainer = make_trainer("ProGrad", opts=PROGRAD)
    zs = make_trainer("ZeroshotCLIP", eval_only=True)
    images = _batch(trainer)["img"]
    with torch.no_grad():
        torch.testing.assert_close(trainer.teacher_logits(trainer.forward_parts(images)), zs.inference(images))
    assert trainer.prograd_template == "a photo of the number {}."


def test_distill_loss_is_t_squared_kl_plus_the_teacher_entropy():
    s, z, T = torch.randn(6, 5), torch.randn(6, 5), 2.0
    p = F.softmax(z / T, dim=-1)
    kl = F.kl_div(F.log_softmax(s / T, dim=-1), p, reduction="batchmean")
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(distill_loss(s, z, T), T * T * (kl + entropy))


def test_kd_is_an_ordinary_backward_of_the_mixed_loss(make_trainer):
    trainer = make_trainer("ProGrad", opts=PROGRAD, **{"LOSS.NAME": "kd", "LOSS.ALPHA": 0.3, "LOSS.T": 2.0})
    batch = _batch(trainer)
    ce, kl, parts = trainer.prograd_losses(batch)
    torch.testing.assert_close(kl, distill_loss(parts.logits, trainer.teacher_logits(parts), 2.0))
    loss, metrics = trainer.loss(batch)
    torch.testing.assert_close(loss, 0.7 * ce + 0.3 * kl)
    expected = -torch.autograd.grad(0.7 * ce + 0.3 * kl, trainer.model.prompt_learner.ctx)[0]
    torch.testing.assert_close(_step(trainer, batch), expected)
    assert {"loss_ce", "loss_kl", "acc"} <= set(metrics)  # each term logged (and recorded per epoch)


# ---- configuration --------------------------------------------------------------------------------------------------
def test_template_init_right_aligns_the_template_phrase_after_zero_vectors(make_trainer):
    trainer = make_trainer("ProGrad", eval_only=True, opts=PROGRAD, **{
        "TRAINER.COOP.CTX_INIT": "", "TRAINER.COOP.N_CTX": 8, "TRAINER.PROGRAD.TEMPLATE_INIT": True})
    clip, ctx = trainer.model.clip, trainer.model.prompt_learner.ctx
    ids = clip.tokenize(["a photo of the number"])  # the digits template minus " {}."
    n = int(clip.eot_index(ids)[0]) - 1
    assert n == 5 and ctx.shape == (8, clip.width_text)
    assert torch.equal(ctx[:8 - n], torch.zeros(8 - n, clip.width_text))
    assert torch.equal(ctx[8 - n:], clip.token_embedding(ids)[0, 1:1 + n])


@pytest.mark.parametrize("opts,match", [
    ({"LOSS.NAME": "prograd2"}, "LOSS.NAME"),
    ({"LOSS.T": 0.0}, "LOSS.T"),
    ({"TRAINER.PROGRAD.TEMPLATE_INIT": True}, "TEMPLATE_INIT replaces TRAINER.COOP.CTX_INIT"),
    ({"TRAINER.PROGRAD.TEMPLATE_INIT": True, "TRAINER.COOP.CTX_INIT": "", "TRAINER.COOP.N_CTX": 4}, "raise N_CTX"),
])
def test_bad_settings_are_rejected(opts, match, make_trainer):
    with pytest.raises(ValueError, match=match):
        make_trainer("ProGrad", eval_only=True, opts=PROGRAD, **opts)
