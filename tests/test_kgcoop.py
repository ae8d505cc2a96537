"""KgCoOp's knowledge-guided loss: zero at the hand-crafted prompt, a pull toward it, and CoOp's loss at W = 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vltune.tuners.prompting import knowledge_loss

DIGITS_PHRASE = "a photo of the number"  # the generated digits dataset's template is "a photo of the number {}."
KGCOOP = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "OPTIM.NAME": "sgd", "OPTIM.LR": 0.1,
          "OPTIM.MOMENTUM": 0.0, "OPTIM.WEIGHT_DECAY": 0.0, "OPTIM.MAX_EPOCH": 1, "OPTIM.LR_SCHEDULER": "constant",
          "SEED": 1, "TRAINER.COOP.CTX_INIT": "a photo of a"}


def _batch(trainer):
    return trainer.to_device(next(iter(trainer.train_loader_x)))


def test_knowledge_loss_is_one_minus_mean_cosine_of_unit_vectors():
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    expected = 1 - F.cosine_similarity(a, b, dim=-1).mean()  # the official code's form
    torch.testing.assert_close(knowledge_loss(a, b), expected)
    torch.testing.assert_close(knowledge_loss(a, b), (a - b).pow(2).sum(-1).mean() / 2)  # the paper's, halved
    per_image = a.expand(3, -1, -1)  # (B, C, E) text features (CoCoOp-style) broadcast against (C, E)
    torch.testing.assert_close(knowledge_loss(per_image, b), expected)


def test_kg_term_is_exactly_zero_at_the_hand_crafted_prompt_and_positive_elsewhere(make_trainer):
    same = make_trainer("KgCoOp", opts=KGCOOP, **{"TRAINER.COOP.CTX_INIT": DIGITS_PHRASE})
    assert same.kg_template == "a photo of the number {}."
    parts = same.forward_parts(_batch(same)["img"])
    assert same.regularizers({}, parts)["kg"].item() == 0.0  # learned prompt == hand-crafted prompt, bit for bit

    other = make_trainer("KgCoOp", opts=KGCOOP)  # "a photo of a <name>."
    parts = other.forward_parts(_batch(other)["img"])
    kg = knowledge_loss(parts.text, other.teacher("hand_crafted"))
    assert kg.item() > 0
    torch.testing.assert_close(other.regularizers({}, parts)["kg"], 8.0 * kg)  # W = TRAINER.COOP.W (default 8.0)


def test_a_step_on_the_knowledge_loss_alone_pulls_the_features_toward_the_hand_crafted_ones(make_trainer):
    trainer = make_trainer("KgCoOp", opts=KGCOOP)
    hand_crafted = trainer.teacher("hand_crafted")
    ctx = trainer.model.prompt_learner.ctx

    def cosine() -> torch.Tensor:
        return F.cosine_similarity(trainer.model.text_features(), hand_crafted, dim=-1)

    before = cosine().detach()
    loss = knowledge_loss(trainer.model.text_features(), hand_crafted)
    loss.backward()
    with torch.no_grad():
        ctx -= 0.01 * ctx.grad / ctx.grad.norm()  # a small step along −∇L_kg
    after = cosine().detach()
    assert knowledge_loss(trainer.model.text_features(), hand_crafted).item() < loss.item()
    assert after.mean() > before.mean()


def test_w_zero_gives_coops_loss_and_w_adds_the_weighted_knowledge_loss(make_trainer):
    coop = make_trainer("CoOp", opts=KGCOOP)
    batch = _batch(coop)
    coop_loss, _ = coop.loss(batch)
    kg0 = make_trainer("KgCoOp", opts=KGCOOP, **{"TRAINER.COOP.W": 0.0})
    assert torch.equal(kg0.loss(batch)[0], coop_loss)
    kg2 = make_trainer("KgCoOp", opts=KGCOOP, **{"TRAINER.COOP.W": 2.0})
    parts = kg2.forward_parts(batch["img"])
    expected = coop_loss + 2.0 * knowledge_loss(parts.text, kg2.teacher("hand_crafted"))
    torch.testing.assert_close(kg2.loss(batch)[0], expected)
    assert kg2.loss(batch)[0] > coop_loss


def test_only_the_context_is_saved_and_eval_only_skips_the_hand_crafted_features(make_trainer):
    trainer = make_trainer("KgCoOp", opts=KGCOOP)
    assert set(trainer.trainable_state("prompt_learner")) == {"ctx"}
    assert "hand_crafted" not in make_trainer("KgCoOp", eval_only=True).teachers


def test_negative_w_is_rejected(make_trainer):
    with pytest.raises(ValueError, match="TRAINER.COOP.W"):
        make_trainer("KgCoOp", opts=KGCOOP, **{"TRAINER.COOP.W": -1.0})
