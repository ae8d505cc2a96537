"""FT-CLIP: exactly the documented tensors train, staged LR, trainable-only checkpoints, zero-shot logits at start."""

from __future__ import annotations

import os

import pytest
import torch

from trainers.ftclip import FT_TEMPLATES, ft_template

PREFIX = {"te": ["model.token_embedding.weight"], "tpe": ["model.positional_embedding"],
          "ce": ["model.visual.class_embedding"], "conv": ["model.visual.conv1.weight"],
          "ln": ["model.visual.ln_pre.weight", "model.visual.ln_pre.bias"],
          "ipe": ["model.visual.positional_embedding"]}
FT = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05,
      "OPTIM.MAX_EPOCH": 1, "OPTIM.LR_SCHEDULER": "cosine", "SEED": 1}


def _trainable(trainer) -> set[str]:
    return {n for n, p in trainer.model.named_parameters() if p.requires_grad}


def _step(trainer) -> None:
    trainer.set_model_mode("train")
    trainer.forward_backward(trainer.to_device(next(iter(trainer.train_loader_x))))


def test_default_trains_everything_but_the_prefix_modules_and_logit_scale(make_trainer):
    trainer = make_trainer("FinetuneCLIP", opts=FT)
    frozen = {n for n, _ in trainer.model.named_parameters()} - _trainable(trainer)
    assert frozen == {n for ns in PREFIX.values() for n in ns} | {"model.logit_scale"}


@pytest.mark.parametrize("modules", ["te", "conv+ln", "te+tpe+ce+conv+ln+ipe"])
def test_learnable_prefix_modules_unfreezes_exactly_those(modules, make_trainer):
    trainer = make_trainer("FinetuneCLIP", opts=FT, **{"TRAINER.FINETUNE.LEARNABLE_PREFIX_MODULES": modules})
    frozen = {n for n, _ in trainer.model.named_parameters()} - _trainable(trainer)
    still = {n for k, ns in PREFIX.items() if k not in modules.split("+") for n in ns}
    assert frozen == still | {"model.logit_scale"}


def test_unknown_prefix_module_is_rejected(make_trainer):
    with pytest.raises(ValueError, match="LEARNABLE_PREFIX_MODULES"):
        make_trainer("FinetuneCLIP", opts=FT, **{"TRAINER.FINETUNE.LEARNABLE_PREFIX_MODULES": "pe"})


def test_start_layer_freezes_the_first_blocks_of_both_towers_and_they_get_no_gradient(make_trainer):
    trainer = make_trainer("FinetuneCLIP", opts=FT, **{"TRAINER.FINETUNE.START_LAYER": 1})
    lower = ("model.transformer.resblocks.0.", "model.visual.transformer.resblocks.0.")
    upper = ("model.transformer.resblocks.1.", "model.visual.transformer.resblocks.1.")
    names = {n for n, _ in trainer.model.named_parameters()}
    assert any(n.startswith(lower) for n in names) and any(n.startswith(upper) for n in names)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    _step(trainer)
    for n, p in trainer.model.named_parameters():
        if n.startswith(lower):
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[n]), n
        elif n.startswith(upper):
            assert p.requires_grad and p.grad is not None and not torch.equal(p, before[n]), n


def test_frozen_text_tower_is_encoded_once_and_does_not_train(make_trainer):
    trainer = make_trainer("FinetuneCLIP", opts=FT, **{"TRAINER.FINETUNE.LEARNABLE_TEXT": False})
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if not n.startswith("model.visual."))
    assert all(p.requires_grad for n, p in trainer.model.named_parameters()
               if n.startswith("model.visual.transformer."))
    for _ in range(3):
        _step(trainer)
    trainer.test()
    assert trainer.text_encodings == 1
    learned = make_trainer("FinetuneCLIP", opts=FT)
    for _ in range(2):
        _step(learned)
    assert learned.text_encodings == 2  # the text tower trains: encoded every step


def test_frozen_image_tower_does_not_train(make_trainer):
    trainer = make_trainer("FinetuneCLIP", opts=FT, **{"TRAINER.FINETUNE.LEARNABLE_IMAGE": False})
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if n.startswith("model.visual."))
    assert trainer.model.model.transformer.resblocks[0].mlp.c_fc.weight.requires_grad
    with pytest.raises(ValueError, match="nothing trains"):
        make_trainer("FinetuneCLIP", opts=FT,
                     **{"TRAINER.FINETUNE.LEARNABLE_IMAGE": False, "TRAINER.FINETUNE.LEARNABLE_TEXT": False})


def test_staged_lr_gives_the_image_tower_and_the_text_side_their_own_lr(make_trainer):
    trainer = make_trainer("FinetuneCLIP", opts=FT,
                           **{"TRAINER.FINETUNE.TEXT_LR": 2e-5, "TRAINER.FINETUNE.IMAGE_LR": 5e-6})
    groups = {g["name"]: g for g in trainer._optims["clip"].param_groups}
    assert groups["text"]["lr"] == pytest.approx(2e-5) and groups["image"]["lr"] == pytest.approx(5e-6)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(names[id(p)].startswith("model.visual.") for p in groups["image"]["params"])
    assert not any(names[id(p)].startswith("model.visual.") for p in groups["text"]["params"])
    default = make_trainer("FinetuneCLIP", opts=FT)
    assert [g["lr"] for g in default._optims["clip"].param_groups] == pytest.approx([0.05, 0.05])


def test_checkpoint_holds_only_trainable_tensors_and_loads_strictly(tmp_path, make_trainer):
    out = str(tmp_path / "run")
    trainer = make_trainer("FinetuneCLIP", out, opts=FT, **{"TRAINER.FINETUNE.START_LAYER": 1})
    _step(trainer)
    trainer.save_model(0, out)
    state = torch.load(os.path.join(out, "clip", "model.pth.tar-1"), map_location="cpu", weights_only=False)
    assert set(state["state_dict"]) == _trainable(trainer)
    assert "model.token_embedding.weight" not in state["state_dict"]
    fresh = make_trainer("FinetuneCLIP", tmp_path / "fresh", opts=FT, **{"TRAINER.FINETUNE.START_LAYER": 1})
    fresh.load_model(out, epoch=1)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, dict(fresh.model.named_parameters())[n]), n
    other = make_trainer("FinetuneCLIP", tmp_path / "other", opts=FT)  # START_LAYER 0: more keys
    with pytest.raises(KeyError, match="missing"):
        other.load_model(out, epoch=1)


def test_logits_before_training_equal_zero_shot_clip_with_the_ft_template(make_trainer):
    assert ft_template("DescribableTextures", "{} texture.") == FT_TEMPLATES["DescribableTextures"] == "itap of a {}."
    assert ft_template("Digits", "a photo of the number {}.") == "a photo of the number {}."
    trainer = make_trainer("FinetuneCLIP", opts=FT)
    assert trainer.ft_template == trainer.template
    images = next(iter(trainer.test_loader))["img"][:8]
    clip = trainer.model
    with torch.no_grad():
        trainer.set_model_mode("eval")
        trainer.before_evaluate()
        logits = trainer.inference(images)
        trainer.after_evaluate()
        weights = clip.zero_shot_classifier(trainer.classnames, [trainer.template])
        expected = clip.logit_scale * clip.encode_image(images, normalize=True) @ weights.t()
    torch.testing.assert_close(logits, expected)
    trainer.ft_template = "a photo of a {}."  # the template is what the logits use
    with torch.no_grad():
        trainer.before_evaluate()
        assert not torch.allclose(trainer.inference(images), expected)
