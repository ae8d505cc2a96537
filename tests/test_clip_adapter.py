"""CLIP-Adapter: RATIO 0 is zero-shot CLIP; CLIPAdapter encodes the class prompts once per run while
OriginCLIPAdapter re-encodes them on every training forward (same maths); RATIO and REDUCTION are config keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vltune.clip import CLIPBackbone

ADAPTER = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "DATALOADER.TEST.BATCH_SIZE": 8,
           "OPTIM.NAME": "sgd", "OPTIM.LR": 0.1, "OPTIM.MAX_EPOCH": 1, "OPTIM.LR_SCHEDULER": "constant", "SEED": 1}


def _images(trainer, n=8):
    return next(iter(trainer.test_loader))["img"][:n]


@torch.no_grad()
def _eval_logits(trainer, images):
    trainer.set_model_mode("eval")
    trainer.before_evaluate()
    try:
        return torch.cat([trainer.model_inference(images[:4]), trainer.model_inference(images[4:])])
    finally:
        trainer.after_evaluate()


def _count_text_encodings(trainer) -> list[int]:
    """Wrap the backbone's text encoder; the returned one-item list counts its calls."""
    clip, calls, original = trainer.model.clip, [0], trainer.model.clip.encode_text

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    clip.encode_text = counted
    return calls


@pytest.mark.parametrize("name", ["CLIPAdapter", "OriginCLIPAdapter"])
def test_ratio_zero_gives_the_zero_shot_logits_and_the_default_ratio_does_not(name, make_trainer):
    zs = make_trainer("ZeroshotCLIP", eval_only=True, weights="pretrained", opts=ADAPTER)
    images = _images(zs)
    expected = _eval_logits(zs, images)
    plain = make_trainer(name, eval_only=True, weights="pretrained", opts=ADAPTER,
                         **{"TRAINER.CLIP_ADAPTER.RATIO": 0.0})
    torch.testing.assert_close(_eval_logits(plain, images), expected, rtol=0, atol=1e-5)
    adapted = make_trainer(name, eval_only=True, weights="pretrained", opts=ADAPTER)
    assert adapted.model.ratio == 0.2
    assert not torch.allclose(_eval_logits(adapted, images), expected, atol=1e-3)


def test_clip_adapter_encodes_text_once_and_the_origin_variant_every_training_forward(make_trainer):
    counts, at_build = {}, {}
    for name in ("CLIPAdapter", "OriginCLIPAdapter"):
        built = []
        with pytest.MonkeyPatch.context() as mp:  # count the encodings of building the trainer (its teachers) too
            original = CLIPBackbone.encode_text
            mp.setattr(CLIPBackbone, "encode_text", lambda self, *a, **k: built.append(1) or original(self, *a, **k))
            trainer = make_trainer(name, opts=ADAPTER)
        at_build[name] = len(built)
        calls = _count_text_encodings(trainer)
        trainer.set_model_mode("train")
        batches = iter(trainer.train_loader_x)
        for _ in range(3):
            trainer.forward_backward(trainer.to_device(next(batches)))
        after_training = calls[0]
        images = _images(trainer)
        _eval_logits(trainer, images)  # one evaluation of two batches
        after_one_eval = calls[0]
        _eval_logits(trainer, images)
        counts[name] = (after_training, after_one_eval, calls[0])
    assert at_build == {"CLIPAdapter": 1, "OriginCLIPAdapter": 0}
    assert counts["CLIPAdapter"] == (0, 0, 0)  # encoded once at build: training and evaluations share it
    assert counts["OriginCLIPAdapter"] == (3, 4, 5)  # every training forward; once per evaluation


def test_both_variants_give_identical_logits_losses_and_gradients_for_the_same_weights(make_trainer):
    cached = make_trainer("CLIPAdapter", opts=ADAPTER)
    origin = make_trainer("OriginCLIPAdapter", opts=ADAPTER)
    with torch.no_grad():
        for p in cached.model.adapter.parameters():
            p.normal_(std=0.3)  # away from the initialisation, so a wiring difference would show
    origin.model.adapter.load_state_dict(cached.model.adapter.state_dict())
    batch = cached.to_device(next(iter(cached.train_loader_x)))
    for trainer in (cached, origin):
        trainer.set_model_mode("train")
        trainer.model.zero_grad(set_to_none=True)
    losses = [t.loss(batch)[0] for t in (cached, origin)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for a, b in zip(cached.model.adapter.parameters(), origin.model.adapter.parameters(), strict=True):
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    images = _images(cached)
    torch.testing.assert_close(_eval_logits(cached, images), _eval_logits(origin, images), rtol=0, atol=0)


@pytest.mark.parametrize("reduction, expected", [(2, 2 * 64 * 32), (4, 2 * 64 * 16), (8, 2 * 64 * 8)])
def test_reduction_is_a_config_key_that_sets_the_bottleneck(reduction, expected, make_trainer):
    trainer = make_trainer("CLIPAdapter", opts=ADAPTER, **{"TRAINER.CLIP_ADAPTER.REDUCTION": reduction})
    assert trainer.n_trainable == expected
    first, last = trainer.model.adapter.fc[0], trainer.model.adapter.fc[2]
    assert first.weight.shape == (64 // reduction, 64) and first.bias is None and last.bias is None


def test_ratio_is_a_config_key_that_mixes_adapted_and_original_features(make_trainer):
    trainer = make_trainer("CLIPAdapter", opts=ADAPTER, **{"TRAINER.CLIP_ADAPTER.RATIO": 0.7})
    images = _images(trainer, 4)
    with torch.no_grad():
        f = trainer.model.clip.encode_image(images)
        expected = F.normalize(0.7 * F.relu(trainer.model.adapter.fc[2](F.relu(trainer.model.adapter.fc[0](f))))
                               + 0.3 * f, dim=-1)
        parts = trainer.forward_parts(images)
    torch.testing.assert_close(parts.image, expected)
    torch.testing.assert_close(parts.logits, trainer.model.clip.logit_scale * expected @ parts.text.t())


@pytest.mark.parametrize("key, value", [("RATIO", 1.5), ("RATIO", -0.1), ("REDUCTION", 0)])
def test_bad_settings_are_rejected(key, value, make_trainer):
    with pytest.raises(ValueError, match=key):
        make_trainer("CLIPAdapter", opts=ADAPTER, **{f"TRAINER.CLIP_ADAPTER.{key}": value})
