"""The Skip plugin (``TRAINER.SKIP_PLUGIN``) on prompt and adapter trainers: CSkip touches only the kept classes'
text features and leaves evaluation unchanged; the frozen-image cache gives the same step without the image tower;
trainers outside the contract are refused. Supporting trainers are enumerated from the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import eval_logits

from vltune.config import get_cfg
from vltune.data.loader import DatasetWrapper
from vltune.registry import TRAINERS
from vltune.tuners.prompting import knowledge_loss

get_cfg()
SUPPORTING = [n for n in TRAINERS.registered_names() if TRAINERS.get(n).__dict__.get("skip_plugin")]
CSKIP = {"TRAINER.SKIP_PLUGIN.CSKIP": True, "TRAINER.SKIP.TOP_RATIO": 0.2, "TRAINER.SKIP.MAX_TOP": 2,
         "TRAINER.SKIP.LAMBDA": 0.01}  # 10 digits: a head of 2 classes, a tail that almost never survives
SKIP = {"DATASET.NUM_SHOTS": 4, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05,
        "OPTIM.MAX_EPOCH": 1, "OPTIM.LR_SCHEDULER": "cosine", "SEED": 1}


def _batch(trainer):
    return trainer.to_device(next(iter(trainer.train_loader_x)))


def test_the_contract_holders_are_the_documented_trainers():
    assert set(SUPPORTING) == {"CoOp", "KgCoOp", "CLIPAdapter", "OriginCLIPAdapter", "FinetuneCLIP"}


@pytest.mark.parametrize("name", SUPPORTING)
def test_cskip_step_computes_logits_over_the_kept_classes_only(name, make_trainer):
    trainer = make_trainer(name, opts=SKIP, **CSKIP)
    batch = _batch(trainer)
    trainer.set_model_mode("train")
    parts, seen = trainer._skip_parts(batch)
    kept = seen["classes"]
    assert set(batch["label"].tolist()) <= set(kept.tolist()) and len(kept) < trainer.num_classes
    assert parts.logits.shape == (len(batch["label"]), len(kept)) and parts.text.shape[0] == len(kept)
    assert torch.equal(kept[seen["label"]], batch["label"])
    metrics = trainer.forward_backward(batch)
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_coop_cskip_runs_the_text_encoder_on_kept_prompts_and_only_their_context_learns(make_trainer):
    trainer = make_trainer("CoOp", opts=SKIP, **CSKIP, **{"TRAINER.COOP.CSC": True})
    sizes = []
    hook = trainer.model.clip.model.transformer.resblocks[0].register_forward_hook(
        lambda m, args, out: sizes.append(args[0].shape[0]))
    batch = _batch(trainer)
    trainer.set_model_mode("train")
    trainer.loss(batch)
    assert sizes[0] == trainer.num_classes  # the zero-shot prototypes, once per run
    sizes.clear()
    loss, _ = trainer.loss(batch)
    hook.remove()
    kept = trainer._selector.select(trainer.image_features(batch["img"]), batch["label"])[0]  # per-run mask
    assert sizes == [len(kept)] and len(kept) < trainer.num_classes
    loss.backward()
    grad = trainer.model.prompt_learner.ctx.grad
    touched = {c for c in range(trainer.num_classes) if grad[c].abs().sum() > 0}
    assert touched == set(kept.tolist())


def test_coop_with_cskip_evaluates_exactly_like_coop(make_trainer):
    plain = make_trainer("CoOp", opts=SKIP)
    skip = make_trainer("CoOp", opts=SKIP, **CSKIP)
    skip.set_model_mode("train")
    skip.forward_backward(_batch(skip))  # a trained context, copied into plain CoOp
    plain.model.prompt_learner.load_state_dict(skip.model.prompt_learner.state_dict())
    images = next(iter(plain.test_loader))["img"][:8]
    logits = eval_logits(skip, images)
    assert logits.shape == (8, skip.num_classes)
    torch.testing.assert_close(logits, eval_logits(plain, images), rtol=0, atol=0)


def test_kgcoop_knowledge_loss_uses_the_kept_classes(make_trainer):
    trainer = make_trainer("KgCoOp", opts=SKIP, **CSKIP)
    batch = _batch(trainer)
    loss, _ = trainer.loss(batch)
    parts, seen = trainer._skip_parts(batch)  # the same draw: the per-run mask is fixed
    w = trainer.teacher("hand_crafted")[seen["classes"]]
    expected = F.cross_entropy(parts.logits, seen["label"]) + trainer.kg_weight * knowledge_loss(parts.text, w)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["CoOp", "CLIPAdapter"])
def test_cached_frozen_image_features_give_the_same_step_without_the_image_tower(name, make_trainer):
    trainer = make_trainer(name, opts=SKIP, **{"TRAINER.SKIP_PLUGIN.CACHE_IMAGE": True})
    trainer.before_train()
    batch = _batch(trainer)
    assert batch["cached"] and batch["img"].shape == (4, trainer.backbone.embed_dim)
    calls = []
    hook = trainer.backbone.model.visual.transformer.resblocks[0].register_forward_hook(lambda *_: calls.append(1))
    trainer.set_model_mode("train")
    cached_loss, _ = trainer.loss(batch)
    trainer.run_epoch()
    assert not calls  # no training step ran the image tower
    hook.remove()
    dataset = DatasetWrapper(trainer.dm.dataset.train_x, trainer.dm.tfm_train)
    pixels = {**batch, "cached": False, "img": torch.stack([dataset[i]["img"] for i in batch["index"].tolist()])}
    torch.testing.assert_close(trainer.loss(pixels)[0], trainer.loss(batch)[0])
    assert cached_loss.requires_grad
    assert trainer.cost_record()["cache_time_s"] > 0


@pytest.mark.parametrize("name", ["MaPLe", "TCP", "CoCoOp", "ProGrad", "ExtrasLinearProbeCoOp", "SkipTuning"])
def test_trainers_outside_the_contract_refuse_the_plugin(name, make_trainer):
    with pytest.raises(ValueError, match=f"TRAINER.SKIP_PLUGIN is not supported by {name}"):
        make_trainer(name, opts=SKIP, **{"TRAINER.SKIP_PLUGIN.CSKIP": True})


def test_image_cache_needs_deterministic_transforms_and_a_frozen_image_path(make_trainer):
    with pytest.raises(ValueError, match=r"INPUT.TRANSFORMS has random \['random_flip'\]"):
        make_trainer("CoOp", opts=SKIP,
                     **{"TRAINER.SKIP_PLUGIN.CACHE_IMAGE": True, "INPUT.TRANSFORMS": "('random_flip', 'normalize')"})
    trainer = make_trainer("FinetuneCLIP", opts=SKIP, **{"TRAINER.SKIP_PLUGIN.CACHE_IMAGE": True})
    with pytest.raises(ValueError, match="image path trains here"):
        trainer.before_train()
