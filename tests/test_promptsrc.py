"""PromptSRC: GPA equals the hand-computed Gaussian-weighted average of the per-epoch prompts (and survives a resume),
depth d prompts reach exactly blocks 0..d-1 of each tower, disabled prompts give zero-shot CLIP, and the
self-regulating losses follow methods.md §7 (weights 25/10/1, L1 means, KL at T = 1 summed then ÷ B·C)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clip_fixtures import make_deep_backbone

import vltune  # noqa: F401  (compat shim: must precede open_clip/torchvision)

# isort: split

from trainers.promptsrc import KL_TEMPERATURE, SRCPromptLearner, ensemble_text_features, gpa_weights, kl_to_zero_shot
from vltune.clip import IMAGENET_TEMPLATES, PROMPTSRC_TEMPLATES
from vltune.tuners.deep_prompts import DeepPromptModel

OFF = {"TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT": 0, "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION": 0}
# Built with seed=1, as train.py seeds before building: the deep prompts' random init.
PROMPTSRC = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "DATALOADER.TEST.BATCH_SIZE": 16,
             "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05, "OPTIM.MAX_EPOCH": 1, "SEED": 1, "TRAINER.PROMPTSRC.PREC": "fp32",
             "TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT": 2, "TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION": 2}


def _prompts(trainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trainer.model.prompt_learner.named_parameters()}


# ---- GPA ---------------------------------------------------------------------------------------------------------
def test_gpa_weights_are_the_normalised_gaussian_density_over_epochs_1_to_E():
    pdf = [math.exp(-0.5 * ((e - 15) / 1) ** 2) / (1 * math.sqrt(2 * math.pi)) for e in range(1, 21)]
    torch.testing.assert_close(gpa_weights(15, 1, 20), torch.tensor(pdf, dtype=torch.float64) / sum(pdf))
    assert torch.isfinite(gpa_weights(45, 1, 3)).all() and gpa_weights(45, 1, 3)[-1] > 0.99  # far mean: no 0/0


GPA = {"OPTIM.MAX_EPOCH": 3, "TRAINER.PROMPTSRC.GPA_MEAN": 2, "TRAINER.PROMPTSRC.GPA_STD": 1, "TEST.NO_TEST": True}


def _train_recording(trainer, stop_after: int | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Train; return the prompts at the end of each epoch's batches (before GPA touches them)."""
    snapshots, run_epoch = {}, trainer.run_epoch

    def record():
        if stop_after is not None and trainer.epoch == stop_after:
            raise KeyboardInterrupt  # a killed run
        run_epoch()
        snapshots[trainer.epoch] = _prompts(trainer)

    trainer.run_epoch = record
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return snapshots


@pytest.fixture(scope="module")
def gpa_run(tmp_path_factory, make_trainer):
    out = str(tmp_path_factory.mktemp("gpa"))
    trainer = make_trainer("PromptSRC", out, seed=1, opts=PROMPTSRC, **GPA)
    return trainer, _train_recording(trainer), out


def test_gpa_prompts_are_the_gaussian_weighted_average_of_the_epoch_snapshots(gpa_run):
    trainer, snapshots, _ = gpa_run
    assert sorted(snapshots) == [0, 1, 2]
    g = [math.exp(-0.5 * ((e - 2) / 1) ** 2) for e in (1, 2, 3)]
    g = [x / sum(g) for x in g]
    final = _prompts(trainer)
    for name, value in final.items():
        expected = sum(g[e] * snapshots[e][name] for e in range(3))
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(value, snapshots[2][name], atol=1e-6), "GPA changed nothing"


def test_the_last_checkpoint_holds_the_gpa_prompts(gpa_run, make_trainer):
    trainer, _, out = gpa_run
    fresh = make_trainer("PromptSRC", eval_only=True, seed=1, opts=PROMPTSRC, **GPA)
    fresh.load_model(out, epoch=3)
    for name, value in _prompts(fresh).items():
        torch.testing.assert_close(value, _prompts(trainer)[name], rtol=0, atol=0)


def test_gpa_survives_a_resume(gpa_run, tmp_path, make_trainer):
    trainer, _, _ = gpa_run
    killed = make_trainer("PromptSRC", tmp_path, seed=1, opts=PROMPTSRC, **GPA)
    _train_recording(killed, stop_after=2)  # epochs 1 and 2 done and checkpointed, killed during epoch 3
    resumed = make_trainer("PromptSRC", tmp_path, seed=1, opts=PROMPTSRC, **GPA)
    resumed.train()
    assert resumed.resumed_from == 2
    for name, value in _prompts(resumed).items():
        torch.testing.assert_close(value, _prompts(trainer)[name], rtol=1e-5, atol=1e-6)


# ---- where the prompts go ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_clip():
    """A random CLIP with 4 blocks per tower, so that blocks with and without prompts both exist."""
    return make_deep_backbone(4, 4)


def _block_inputs(clip, run) -> dict[tuple[str, int], torch.Tensor]:
    """The (N, L, D) input every block of both towers sees during ``run()``, read by torch pre-hooks."""
    inputs, handles = {}, []
    towers = {"text": clip.model.transformer, "image": clip.model.visual.transformer}
    for tower, transformer in towers.items():
        for i, block in enumerate(transformer.resblocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, args, key=(tower, i): inputs.__setitem__(key, args[0].clone())))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return inputs


@pytest.mark.parametrize("depth_text,depth_vision", [(2, 3), (4, 1), (1, 4)])
def test_depth_d_puts_fresh_prompts_into_exactly_blocks_0_to_d_minus_1(deep_clip, depth_text, depth_vision):
    learner = SRCPromptLearner(deep_clip, ["cat", "sea lion"], 4, "a photo of a", depth_text, 4, depth_vision)
    model = DeepPromptModel(deep_clip, learner)
    images = torch.randn(3, 3, 32, 32)
    seen = _block_inputs(deep_clip, lambda: (model.text_features(), model.image_features(images)))
    pos = deep_clip.model.positional_embedding[1:5]
    ln_pre = deep_clip.model.visual.ln_pre
    n_patches = 1 + (32 // 8) ** 2
    for i in range(4):
        text, image = seen[("text", i)][:, 1:5], seen[("image", i)]
        if i == 0:  # block 0: the learnable ctx (token space, + positions), and the appended ln_pre(VPT) tokens
            torch.testing.assert_close(text, (learner.ctx + pos).expand_as(text), rtol=0, atol=1e-6)
        elif i < depth_text:
            torch.testing.assert_close(text, learner.text_prompts[i - 1].expand_as(text), rtol=0, atol=0)
        else:
            assert not any(torch.allclose(text[0], p, atol=1e-3) for p in learner.text_prompts)
        if i < depth_vision:
            expected = ln_pre(learner.visual_prompts[0]) if i == 0 else learner.visual_prompts[i]
            assert image.shape[1] == n_patches + 4
            torch.testing.assert_close(image[:, -4:], expected.expand(3, -1, -1), rtol=0, atol=1e-6)
        else:
            assert not any(torch.allclose(image[0, -4:], p, atol=1e-3) for p in learner.visual_prompts)
    assert learner.text_prompts.shape[0] == depth_text - 1 and learner.visual_prompts.shape[0] == depth_vision


def test_without_prompts_logits_equal_zero_shot_clip_with_the_same_template(make_trainer):
    trainer = make_trainer("PromptSRC", eval_only=True, seed=1, opts=PROMPTSRC, **OFF)
    assert trainer.n_trainable == 0
    images = next(iter(trainer.test_loader))["img"][:8]
    trainer.before_evaluate()
    with torch.no_grad():
        logits = trainer.inference(images)
        clip = trainer.model.clip
        w = clip.zero_shot_classifier(trainer.classnames, ["a photo of a {}."])
        expected = clip.logit_scale * clip.encode_image(images, normalize=True) @ w.t()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    prompted = make_trainer("PromptSRC", eval_only=True, seed=1, opts=PROMPTSRC)
    prompted.before_evaluate()
    with torch.no_grad():
        assert not torch.allclose(prompted.inference(images), expected, atol=1e-2)


# ---- losses ------------------------------------------------------------------------------------------------------
def test_the_text_teacher_is_the_renormalised_mean_of_raw_features_over_upstreams_60_templates(deep_clip):
    assert len(PROMPTSRC_TEMPLATES) == 60 and set(PROMPTSRC_TEMPLATES) == set(IMAGENET_TEMPLATES[:60])
    names = ["cat", "ice_cream cone"]
    with torch.no_grad():
        raw = [deep_clip.encode_text(deep_clip.tokenize([t.format(n.replace("_", " ")) for t in PROMPTSRC_TEMPLATES]))
               for n in names]
    expected = F.normalize(torch.stack([r.mean(dim=0) for r in raw]), dim=-1)
    torch.testing.assert_close(ensemble_text_features(deep_clip, names, batch_size=37), expected)


def test_regularising_losses_vanish_when_the_prompts_are_disabled(make_trainer):
    trainer = make_trainer("PromptSRC", seed=1, opts=PROMPTSRC, **OFF)
    images = next(iter(trainer.train_loader_x))["img"]
    with torch.no_grad():
        parts = trainer.forward_parts(images)
        src = trainer.src_losses(images, parts)
        assert src["text"] > 1e-4 and src["kl"] > 0  # the 60-template teacher differs from the one prompt
        # with the teacher made the hand-crafted prompt's features, prompted = frozen everywhere
        trainer.teachers["text"] = parts.text.float().clone()
        src = trainer.src_losses(images, parts)
    for name, value in src.items():
        assert abs(float(value)) < 1e-6, name


def test_kl_is_upstreams_at_temperature_1_summed_then_divided_by_b_times_c():
    assert KL_TEMPERATURE == 1.0
    torch.manual_seed(0)
    s, z = torch.randn(4, 6) * 3, torch.randn(4, 6) * 3
    p_z, log_p_s = z.softmax(dim=1), s.log_softmax(dim=1)
    expected = (p_z * (p_z.log() - log_p_s)).sum() / (4 * 6)
    torch.testing.assert_close(kl_to_zero_shot(s, z), expected)
    assert not torch.allclose(kl_to_zero_shot(s, z), kl_to_zero_shot(z, s))  # KL(p_z ‖ p_s), not the reverse


@pytest.mark.parametrize("weights", [None, (3, 7)])
def test_loss_is_ce_plus_weighted_l1s_plus_kl_with_weights_from_config(weights, make_trainer):
    extra = {} if weights is None else {"TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT": weights[0],
                                        "TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT": weights[1]}
    trainer = make_trainer("PromptSRC", seed=1, opts=PROMPTSRC, **extra)
    w_text, w_image = weights or (25, 10)
    batch = trainer.to_device(next(iter(trainer.train_loader_x)))
    with torch.no_grad():
        parts = trainer.forward_parts(batch["img"])
        src = trainer.src_losses(batch["img"], parts)
        expected = w_text * src["text"] + w_image * src["image"] + 1.0 * src["kl"]
        terms = trainer.regularizers(batch, parts)
        assert set(terms) == {"text_l1", "image_l1", "kl"}  # each logged and recorded on its own
        torch.testing.assert_close(sum(terms.values()), expected)
        loss, metrics = trainer.loss(batch)
        torch.testing.assert_close(loss, F.cross_entropy(parts.logits, batch["label"]) + expected)
        assert {"loss_ce", "loss_text_l1", "loss_image_l1", "loss_kl", "acc"} <= set(metrics)
    assert all(float(v) > 0 for v in src.values())
