"""Skip Tuning: the LSkip step equals the full-prefix step and never runs the frozen prefix; CSkip's selection follows
methods.md §13.4; single-class batches; the epoch rule as a config block; inference is a plain CLIP forward."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, eval_logits

from vltune.config import get_cfg
from vltune.data.loader import DatasetWrapper
from vltune.tuners.skip import (
    ClassSelector,
    class_batches,
    expected_kept,
    head_size,
    resolve_sampler,
    tail_keep_probability,
)

SKIP = {"DATASET.NUM_SHOTS": 8, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05,
        "OPTIM.MAX_EPOCH": 2, "OPTIM.LR_SCHEDULER": "cosine", "SEED": 1, "TRAINER.SKIP.START_LAYER": 1,
        "TRAINER.SKIP.CACHE_DTYPE": "fp32", "TRAINER.SKIP.QUICK_BATCH_SIZE": 32}


class Calls:
    """Counts forward calls of the frozen prefix: the embedding modules and block 0 of both towers (ω = 1)."""

    def __init__(self, trainer) -> None:
        clip = trainer.model.model
        self.modules = {"text_block0": clip.transformer.resblocks[0],
                        "image_block0": clip.visual.transformer.resblocks[0],
                        "token_embedding": clip.token_embedding, "conv1": clip.visual.conv1}
        self.n = dict.fromkeys(self.modules, 0)
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in self.modules.items()]

    def _hook(self, key):
        def hook(*_):
            self.n[key] += 1
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _cached_batch(trainer):
    trainer.before_train()
    trainer.epoch = 0
    trainer.before_epoch()
    return trainer.to_device(next(iter(trainer.train_loader_x)))


def _grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_cached_step_equals_the_full_forward_step_and_never_runs_the_frozen_prefix(make_trainer):
    trainer = make_trainer("SkipTuning", opts=SKIP)
    batch = _cached_batch(trainer)
    assert batch["cached"] and batch["img"].shape[1:] == (17, 64)  # block-0 tokens, 1 + 16 patches, width 64
    calls = Calls(trainer)
    trainer.set_model_mode("train")
    loss, _ = trainer.loss(batch)
    loss.backward()
    assert calls.n == dict.fromkeys(calls.n, 0), calls.n
    skipped = _grads(trainer)
    frozen = [p for n, p in trainer.model.named_parameters() if ".resblocks.0." in n or "embedding" in n]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)

    # reference: the plain CLIP forward on the same images, every block run, class prompts encoded from scratch
    trainer.model.zero_grad(set_to_none=True)
    dataset = DatasetWrapper(trainer.dm.dataset.train_x, trainer.dm.tfm_train)
    images = torch.stack([dataset[i]["img"] for i in batch["index"].tolist()])
    clip = trainer.model
    image = F.normalize(clip.encode_image(images), dim=-1)
    kept, target = trainer.selector.select(image, batch["label"])
    names = [trainer.classnames[i].replace("_", " ") for i in kept.tolist()]
    text = clip.encode_text(clip.tokenize([trainer.ft_template.format(n) for n in names]), normalize=True)
    reference = F.cross_entropy(clip.logit_scale * image @ text.t(), target)
    reference.backward()
    assert calls.n["text_block0"] > 0 and calls.n["image_block0"] > 0  # the counters do see the prefix run
    calls.remove()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    full = _grads(trainer)
    assert set(full) == set(skipped)
    for name in full:
        torch.testing.assert_close(skipped[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_pixel_batches_give_the_same_step_as_cached_ones(make_trainer):
    trainer = make_trainer("SkipTuning", opts=SKIP)
    batch = _cached_batch(trainer)
    dataset = DatasetWrapper(trainer.dm.dataset.train_x, trainer.dm.tfm_train)
    pixels = {**batch, "cached": False, "img": torch.stack([dataset[i]["img"] for i in batch["index"].tolist()])}
    torch.testing.assert_close(trainer.loss(pixels)[0], trainer.loss(batch)[0])


def test_training_epochs_cache_text_once_and_images_once_per_epoch(make_trainer):
    trainer = make_trainer("SkipTuning", opts=SKIP, **{"TEST.NO_TEST": True})
    calls = Calls(trainer)
    trainer.train()
    calls.remove()
    # QUICK_BATCH_SIZE 32 over 80 training images: 3 cache batches per epoch, 2 epochs; one text chunk per run
    assert calls.n == {"text_block0": 1, "image_block0": 6, "token_embedding": 1, "conv1": 6}
    record = trainer.cost_record()
    assert record["cache_time_s"] > 0 and record["train_time_s"] > 0
    assert trainer.method_record()["sampler"] == "single_class"  # 8 shots >= batch 4
    assert trainer.train_loader_x is trainer.dm.train_loader_x  # the cache is dropped after training


def test_inference_is_a_full_clip_forward_over_all_classes(make_trainer):
    trainer = make_trainer("SkipTuning", opts=SKIP, **{"TEST.NO_TEST": True})
    trainer.train()
    images = next(iter(trainer.test_loader))["img"][:6]
    clip = trainer.model
    with torch.no_grad():
        names = [c.replace("_", " ") for c in trainer.classnames]
        text = clip.encode_text(clip.tokenize([trainer.ft_template.format(n) for n in names]), normalize=True)
        expected = clip.logit_scale * F.normalize(clip.encode_image(images), dim=-1) @ text.t()
    torch.testing.assert_close(eval_logits(trainer, images), expected, rtol=1e-5, atol=1e-5)


def test_staged_lr_puts_image_tower_and_text_side_in_their_groups(make_trainer):
    trainer = make_trainer("SkipTuning", opts=SKIP,
                           **{"TRAINER.FINETUNE.TEXT_LR": 0.02, "TRAINER.FINETUNE.IMAGE_LR": 0.005})
    groups = {g["name"]: g for g in trainer._optims["clip"].param_groups}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert groups["image"]["lr"] == 0.005 and groups["text"]["lr"] == 0.02
    assert all(names[id(p)].startswith("model.visual.") for p in groups["image"]["params"])
    assert not any(names[id(p)].startswith("model.visual.") for p in groups["text"]["params"])


def test_drop_ratio_keeps_the_cls_token(make_trainer):
    trainer = make_trainer("SkipTuning", opts=SKIP, **{"TRAINER.SKIP.DROP_RATIO": 0.5})
    x = torch.randn(2, 17, 8)
    out = trainer._drop_tokens(x)
    assert out.shape == (2, 9, 8) and torch.equal(out[:, 0], x[:, 0])
    rows = {tuple(r.tolist()) for r in x[0, 1:]}
    assert all(tuple(r.tolist()) in rows for r in out[0, 1:])


@pytest.mark.parametrize(("key", "value", "match"), [
    ("TRAINER.FINETUNE.START_LAYER", 1, "leave TRAINER.FINETUNE.START_LAYER at 0"),
    ("TRAINER.FINETUNE.LEARNABLE_PREFIX_MODULES", "te", "LEARNABLE_PREFIX_MODULES empty"),
    ("TRAINER.SKIP.START_LAYER", 3, r"TRAINER.SKIP.START_LAYER 3 exceeds the towers' depth"),
    ("TRAINER.SKIP.MASK_POLICY", "per_step", "choose from per_run, per_epoch, per_batch"),
    ("TRAINER.SKIP.SAMPLER", "classwise", "choose from auto, single_class, random"),
])
def test_bad_settings_fail_naming_the_key(key, value, match, make_trainer):
    with pytest.raises(ValueError, match=match):
        make_trainer("SkipTuning", opts=SKIP, **{key: value})


def test_the_quarter_epoch_rule_is_a_per_dataset_config_block():
    for config, full, quarter in (("vit_b16_bs4", 20, 5), ("vit_b16_bs4_few_shot", 40, 10),
                                  ("vit_b16_bs4_cross_datasets", 20, 5)):
        path = str(REPO / "configs" / "trainers" / "SkipTuning" / f"{config}.yaml")
        for dataset, epochs in (("ImageNet", quarter), ("SUN397", quarter), ("Food101", quarter),
                                ("OxfordPets", full), ("EuroSAT", full)):
            cfg = get_cfg(config_file=path, opts=["TRAINER.NAME", "SkipTuning", "DATASET.NAME", dataset])
            assert cfg.OPTIM.MAX_EPOCH == epochs, (config, dataset)


# ---------------------------------------------------------------------------------------------------- CSkip
@pytest.mark.parametrize(("classes", "kept"), [(500, 77), (1000, 107), (199, 59), (98, 52.4), (24, 13.3),
                                               (19, 11.1), (5, 4)])
def test_expected_kept_classes_match_the_documented_table(classes, kept):
    assert expected_kept(classes, 0.5, 50, 0.3) == pytest.approx(kept, abs=0.6)  # methods.md §13.4 table


def test_head_size_rules():
    assert head_size(500, 0.5, 50) == 50 and head_size(40, 0.5, 50) == 20 and head_size(41, 0.5, 50) == 21
    assert head_size(100, 1.0, 10) == 100  # TOP_RATIO 1 keeps everything, whatever MAX_TOP
    assert head_size(100, 30, 50) == 30 and head_size(20, 30, 50) == 20  # > 1: a class count
    p = tail_keep_probability(11, 0.3)
    assert p[0] == 1.0 and p[-1] == 0.0 and bool((p[1:] <= p[:-1]).all())
    assert p[2] == pytest.approx((math.exp(-1 / 0.3) - math.exp(-5 / 0.3)) / (1 - math.exp(-5 / 0.3)))


def test_kept_count_distribution_follows_the_formula():
    classes, draws = 500, 4000
    selector = ClassSelector(F.normalize(torch.randn(classes, 16), dim=-1), 0.5, 50, 0.3, "per_batch", seed=0)
    masks = torch.stack([selector.sample_mask() for _ in range(draws)]).double()
    p = torch.cat([torch.ones(50, dtype=torch.float64), tail_keep_probability(450, 0.3)])
    sigma = (p * (1 - p) / draws).sqrt()
    assert bool(((masks.mean(0) - p).abs() <= 5 * sigma + 3 / draws).all())  # each rank position's keep frequency
    counts = masks.sum(1)
    assert counts.mean().item() == pytest.approx(expected_kept(classes, 0.5, 50, 0.3), abs=0.3)
    assert counts.var().item() == pytest.approx(float((p * (1 - p)).sum()), rel=0.15)


def test_ground_truth_classes_are_always_kept_and_labels_remapped():
    torch.manual_seed(0)
    protos = F.normalize(torch.randn(40, 16), dim=-1)
    selector = ClassSelector(protos, 0.05, 2, 0.01, "per_batch", seed=0)  # head of 2, almost no tail
    for _ in range(50):
        labels = torch.randint(40, (16,))
        kept, remapped = selector.select(torch.randn(16, 16), labels)
        assert bool((kept[1:] > kept[:-1]).all())  # ascending, unique
        assert torch.equal(kept[remapped], labels)
        assert set(labels.tolist()) <= set(kept.tolist())


def test_head_holds_the_classes_most_similar_to_the_batch():
    protos = torch.eye(10)
    selector = ClassSelector(protos, 0.3, 50, 0.01, "per_run", seed=0)  # head 3; the tail keeps only its first
    image = torch.stack([protos[7] + 0.5 * protos[2], protos[4]])
    kept, remapped = selector.select(image, torch.tensor([7, 7]))
    assert {7, 4, 2} <= set(kept.tolist())  # label first, then the best-matching classes
    assert kept[remapped].tolist() == [7, 7]


def test_mask_policies():
    protos = F.normalize(torch.randn(200, 8), dim=-1)
    per_run = ClassSelector(protos, 0.1, 50, 0.5, "per_run", seed=3)
    first = per_run.mask()
    per_run.new_epoch(1)
    assert per_run.mask() is first
    per_epoch = ClassSelector(protos, 0.1, 50, 0.5, "per_epoch", seed=3)
    e1 = per_epoch.mask().clone()
    assert torch.equal(per_epoch.mask(), e1)
    per_epoch.new_epoch(1)
    e2 = per_epoch.mask().clone()
    per_epoch.new_epoch(1)
    assert torch.equal(per_epoch.mask(), e2) and not torch.equal(e1, e2)  # replays per (seed, epoch)
    per_batch = ClassSelector(protos, 0.1, 50, 0.5, "per_batch", seed=3)
    assert not torch.equal(per_batch.mask(), per_batch.mask())


# ---------------------------------------------------------------------------------------------------- batches
def test_single_class_batches_cover_full_batches_of_each_class_once():
    labels = [0] * 16 + [1] * 9 + [2] * 4
    batches = class_batches(labels, 4, "single_class", torch.Generator().manual_seed(0))
    assert len(batches) == 4 + 2 + 1
    assert all(len(b) == 4 and len({labels[i] for i in b}) == 1 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    assert len({labels[b[0]] for b in batches[:3]}) > 1 or len({labels[b[0]] for b in batches}) == 3


def test_random_batches_drop_the_remainder():
    batches = class_batches(list(range(10)), 4, "random", torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4] and len({i for b in batches for i in b}) == 8
    assert class_batches([0, 1], 4, "random", torch.Generator().manual_seed(0))[0] in ([0, 1], [1, 0])


def test_sampler_choice_and_fallback_when_a_class_is_smaller_than_a_batch(caplog):
    assert resolve_sampler("auto", 16, 4, [0] * 16 + [1] * 16) == "single_class"
    assert resolve_sampler("auto", 2, 4, [0] * 2 + [1] * 2) == "random"
    with caplog.at_level(logging.WARNING):
        assert resolve_sampler("single_class", 16, 4, [0] * 16 + [1] * 3) == "random"
    assert "classes [1] have fewer" in caplog.text


def test_a_class_smaller_than_the_batch_trains_without_crashing(make_trainer):
    trainer = make_trainer("SkipTuning", opts=SKIP,
                           **{"DATASET.NUM_SHOTS": 2, "TRAINER.SKIP.SAMPLER": "single_class", "TEST.NO_TEST": True})
    assert trainer.sampler_mode == "random"
    trainer.train()
    assert trainer.method_record()["mean_kept_classes"] >= 1


def test_each_epoch_recaches_fresh_augmentations_into_the_same_buffer(make_trainer):
    trainer = make_trainer("SkipTuning", opts=SKIP, **{"INPUT.TRANSFORMS": "('random_flip', 'normalize')"})
    trainer.before_train()
    trainer.epoch = 0
    trainer.before_epoch()
    first = trainer.train_loader_x.features
    before = first.clone()
    trainer.epoch = 1
    trainer.before_epoch()
    again = trainer.train_loader_x.features
    assert again.data_ptr() == first.data_ptr()  # no second allocation
    flipped = (again - before).abs().flatten(1).amax(1) > 0
    assert 0 < int(flipped.sum()) < len(flipped)  # a fresh random flip per image and epoch
