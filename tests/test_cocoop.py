"""CoCoOp: per-image conditioning, one batched text-encoder pass per forward, per-batch inference, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import eval_logits

from vltune.config import ConfigError
from vltune.engine.checkpoint import atomic_torch_save

META_KEYS = ["meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight", "meta_net.linear2.bias"]
# Built with seed=1: the Meta-Net's init (as train.py seeds before building); tiny CLIP: only 4 hidden units.
COCOOP = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "DATALOADER.TEST.BATCH_SIZE": 16,
          "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05, "OPTIM.MAX_EPOCH": 1, "TRAINER.COCOOP.N_CTX": 4, "SEED": 1}


def _test_batches(trainer, n=2):
    batches = iter(trainer.test_loader)
    return [next(batches)["img"] for _ in range(n)]


@pytest.fixture()
def cocoop(make_trainer):
    return make_trainer("CoCoOp", eval_only=True, seed=1, opts=COCOOP)


def _count_text_calls(monkeypatch, clip):
    original, sizes = clip.encode_text_from_embeddings, []

    def counted(prompt_embeds, eot_idx, *args, **kwargs):
        sizes.append(prompt_embeds.shape[0])
        return original(prompt_embeds, eot_idx, *args, **kwargs)

    monkeypatch.setattr(clip, "encode_text_from_embeddings", counted)
    return sizes


def test_batched_inference_equals_per_sample_and_each_image_gets_its_own_prompts(cocoop):
    images = torch.cat(_test_batches(cocoop))[:12]
    batched = torch.cat([eval_logits(cocoop, images[:5]), eval_logits(cocoop, images[5:])])  # batches of other sizes
    single = torch.cat([eval_logits(cocoop, images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        text = cocoop.forward_parts(images).text
    assert text.shape == (len(images), cocoop.num_classes, cocoop.model.clip.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(text.shape[:2]))
    # The Meta-Net's shift acts: the class text features differ from one image to the next.
    assert (text[1:] - text[:1]).abs().amax() > 1e-3


def test_every_test_batch_is_scored_on_its_own_images(cocoop, monkeypatch):
    """Regression for SkipTuning's CoCoOp, whose model_inference returned the first test batch's logits forever."""
    seen, process = [], cocoop.evaluator.process

    def recorded(logits, labels):
        seen.append(logits)
        process(logits, labels)

    monkeypatch.setattr(cocoop.evaluator, "process", recorded)
    loader = iter(cocoop.test_loader)
    cocoop.test_loader = [next(loader) for _ in range(3)]  # the engine's evaluation loop on three test batches
    cocoop.test()
    batches = [b["img"] for b in cocoop.test_loader]
    assert len(seen) == len(batches)
    for got, images in zip(seen, batches):
        torch.testing.assert_close(got, eval_logits(cocoop, images).float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[0], seen[1])


def test_one_text_encoder_call_per_forward_not_one_per_image(cocoop, monkeypatch):
    images = _test_batches(cocoop, 1)[0][:8]
    n_cls = cocoop.num_classes
    sizes = _count_text_calls(monkeypatch, cocoop.model.clip)
    expected = eval_logits(cocoop, images)
    assert sizes == [len(images) * n_cls]
    sizes.clear()
    cocoop.set_model_mode("train")
    cocoop.loss({"img": images, "label": torch.zeros(len(images), dtype=torch.long)})
    assert sizes == [len(images) * n_cls]
    # TEXT_BATCH_SIZE chunks the B × C prompts (memory bound) without changing the result.
    sizes.clear()
    cocoop.model.text_batch_size = 3 * n_cls + 1
    chunked = eval_logits(cocoop, images)
    assert len(sizes) == math.ceil(len(images) * n_cls / (3 * n_cls + 1)) and sum(sizes) == len(images) * n_cls
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


def test_with_the_meta_net_output_zeroed_cocoop_is_coop(make_trainer):
    cocoop = make_trainer("CoCoOp", eval_only=True, seed=1, opts=COCOOP)
    coop = make_trainer("CoOp", eval_only=True, seed=1, opts=COCOOP, **{"TRAINER.COOP.N_CTX": 4})
    with torch.no_grad():
        coop.model.prompt_learner.ctx.copy_(cocoop.model.prompt_learner.ctx)
    images = _test_batches(cocoop, 1)[0]
    assert not torch.allclose(eval_logits(cocoop, images), eval_logits(coop, images), atol=1e-4)
    with torch.no_grad():
        last = cocoop.model.prompt_learner.meta_net.linear2
        last.weight.zero_()
        last.bias.zero_()
    torch.testing.assert_close(eval_logits(cocoop, images), eval_logits(coop, images), rtol=1e-5, atol=1e-5)


def test_checkpoint_holds_ctx_and_meta_net_and_upstream_files_load(cocoop, tmp_path):
    state = cocoop.trainable_state("prompt_learner")
    assert sorted(state) == sorted(["ctx", *META_KEYS])
    upstream = {k: torch.randn_like(v).half() for k, v in state.items()}
    upstream |= {"token_prefix": torch.zeros(5, 1, 64).half(), "token_suffix": torch.zeros(5, 72, 64).half()}
    ckpt = {"state_dict": upstream, "epoch": 10, "optimizer": None, "scheduler": None}
    atomic_torch_save(ckpt, str(tmp_path / "up" / "prompt_learner" / "model.pth.tar-10"))
    cocoop.load_model(str(tmp_path / "up"), epoch=10)
    loaded = dict(cocoop.model.prompt_learner.named_parameters())
    assert all(torch.equal(loaded[k].data, upstream[k].float()) for k in state)
    del upstream["meta_net.linear2.bias"]
    atomic_torch_save(ckpt, str(tmp_path / "bad" / "prompt_learner" / "model.pth.tar-10"))
    with pytest.raises(KeyError, match=r"missing \['meta_net.linear2.bias'\]"):
        cocoop.load_model(str(tmp_path / "bad"), epoch=10)


def test_ctx_init_sets_the_context_length_and_amp_trains_float_master_weights(make_trainer):
    trainer = make_trainer("CoCoOp", seed=1, opts=COCOOP,
                           **{"TRAINER.COCOOP.CTX_INIT": "a photo of a", "TRAINER.COCOOP.PREC": "amp"})
    learner = trainer.model.prompt_learner
    assert learner.ctx.shape == (4, 64) and trainer.precision.dtype == torch.bfloat16
    before = {k: p.detach().clone() for k, p in learner.named_parameters()}
    trainer.set_model_mode("train")
    metrics = trainer.forward_backward(trainer.to_device(next(iter(trainer.train_loader_x))))
    assert math.isfinite(metrics["loss"])
    for k, p in learner.named_parameters():
        assert p.dtype == torch.float32 and not torch.equal(p.detach(), before[k]), k
    with trainer.precision.autocast():
        logits = eval_logits(trainer, _test_batches(trainer, 1)[0])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("key,value,error", [("TRAINER.COCOOP.CSC", "True", ConfigError),
                                             ("TRAINER.COCOOP.N_CTX", "0", ValueError),
                                             ("TRAINER.COCOOP.TEXT_BATCH_SIZE", "-1", ValueError)])
def test_invalid_settings_are_rejected(key, value, error, make_trainer):
    with pytest.raises(error, match=key.split(".")[-1]):
        make_trainer("CoCoOp", eval_only=True, seed=1, opts=COCOOP, **{key: value})
