"""CoOp's prompt construction (end / middle / front, CSC, CTX_INIT) and its checkpoint compatibility."""

from __future__ import annotations

import pytest
import torch

from vltune.clip import build_backbone
from vltune.engine.checkpoint import atomic_torch_save
from vltune.tuners.prompting import PromptLearner

NAMES = ["sea lion", "cat", "ice_cream cone"]
COOP = {"DATASET.NUM_SHOTS": 1, "OPTIM.MAX_EPOCH": 1}  # eval-only trainers
TRAIN = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "OPTIM.NAME": "sgd", "OPTIM.LR": 1.0,
         "OPTIM.MOMENTUM": 0.0, "OPTIM.WEIGHT_DECAY": 0.0, "OPTIM.MAX_EPOCH": 1, "OPTIM.LR_SCHEDULER": "constant",
         "SEED": 1}


@pytest.fixture(scope="module")
def clip(random_clip_weights):
    return build_backbone("vltune-tiny", random_clip_weights)


def _ids_of(clip, text: str) -> list[int]:
    ids = clip.tokenize([text])[0]
    return ids[1:int(clip.eot_index(ids[None])[0])].tolist()


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_prompt_layout_places_the_class_tokens(clip, position):
    pl = PromptLearner(clip, NAMES, 4, "", False, position)
    prompts, eot = pl()
    table = clip.model.token_embedding.weight
    for i, name in enumerate(NAMES):
        name_ids = _ids_of(clip, name.replace("_", " "))
        start = {"end": 1 + 4, "middle": 1 + 2, "front": 1}[position]
        expected = table[name_ids]
        torch.testing.assert_close(prompts[i, start:start + len(name_ids)], expected, rtol=0, atol=0)
        ctx_rows = {"end": [1, 2, 3, 4], "middle": [1, 2, 3 + len(name_ids), 4 + len(name_ids)],
                    "front": [1 + len(name_ids) + k for k in range(4)]}[position]
        torch.testing.assert_close(prompts[i, ctx_rows], pl.ctx, rtol=0, atol=0)
        assert int(eot[i]) == 1 + 4 + len(name_ids) + 1  # [SOS] ctx name "." → EOT
    assert prompts.shape[1] == int(eot.max()) + 1  # cut to the longest prompt


def test_ctx_init_counts_bpe_tokens_not_words(clip):
    phrase = "a photo of a pet,"  # 5 words, 6 BPE tokens ("pet" and ",")
    pl = PromptLearner(clip, NAMES, 16, phrase, False, "end")
    assert pl.n_ctx == len(_ids_of(clip, phrase)) == 6
    torch.testing.assert_close(pl.ctx.data, clip.model.token_embedding.weight[_ids_of(clip, phrase)])
    prompts, eot = pl()
    ids = clip.tokenize([f"{phrase} {n.replace('_', ' ')}." for n in NAMES])
    features = clip.encode_text_from_embeddings(prompts, eot)
    torch.testing.assert_close(features, clip.encode_text(ids), rtol=1e-5, atol=1e-5)


def test_class_specific_context_has_one_context_per_class(clip):
    pl = PromptLearner(clip, NAMES, 4, "", True, "end")
    assert pl.ctx.shape == (len(NAMES), 4, clip.width_text)
    prompts, _ = pl()
    torch.testing.assert_close(prompts[:, 1:5], pl.ctx, rtol=0, atol=0)


def test_csc_with_ctx_init_is_rejected(make_trainer):
    with pytest.raises(ValueError, match="CSC needs random init"):
        make_trainer("CoOp", eval_only=True, opts=COOP, **{"TRAINER.COOP.CSC": True,
                                                           "TRAINER.COOP.CTX_INIT": "a_photo"})


def test_generic_context_transfers_to_another_class_set_and_csc_does_not(tmp_path, make_trainer):
    base = make_trainer("CoOp", tmp_path / "a", eval_only=True, opts=COOP, **{"DATASET.SUBSAMPLE_CLASSES": "base"})
    base.save_model(0, str(tmp_path / "a"))
    new = make_trainer("CoOp", tmp_path / "b", eval_only=True, opts=COOP, **{"DATASET.SUBSAMPLE_CLASSES": "new"})
    new.load_model(str(tmp_path / "a"), epoch=1)
    assert torch.equal(new.model.prompt_learner.ctx, base.model.prompt_learner.ctx)

    csc = make_trainer("CoOp", tmp_path / "c", eval_only=True, opts=COOP,
                       **{"DATASET.SUBSAMPLE_CLASSES": "base", "TRAINER.COOP.CSC": True})
    csc.save_model(0, str(tmp_path / "c"))
    csc_new = make_trainer("CoOp", tmp_path / "d", eval_only=True, opts=COOP,
                           **{"DATASET.SUBSAMPLE_CLASSES": "all", "TRAINER.COOP.CSC": True})
    with pytest.raises(ValueError, match=r"key 'ctx' has shape \(5, 16, 64\).*expects \(10, 16, 64\)"):
        csc_new.load_model(str(tmp_path / "c"), epoch=1)


def test_upstream_checkpoint_with_prompt_buffers_and_fp16_ctx_loads(tmp_path, make_trainer):
    trainer = make_trainer("CoOp", tmp_path / "run", eval_only=True, opts=COOP)
    ctx = torch.randn(16, 64).half()
    state = {"state_dict": {"ctx": ctx, "token_prefix": torch.zeros(10, 1, 64).half(),
                            "token_suffix": torch.zeros(10, 60, 64).half()},
             "epoch": 50, "optimizer": None, "scheduler": None}
    atomic_torch_save(state, str(tmp_path / "upstream" / "prompt_learner" / "model.pth.tar-50"))
    trainer.load_model(str(tmp_path / "upstream"), epoch=50)
    assert torch.equal(trainer.model.prompt_learner.ctx.data, ctx.float())
    state["state_dict"]["meta_net.weight"] = torch.zeros(2, 2)
    atomic_torch_save(state, str(tmp_path / "bad" / "prompt_learner" / "model.pth.tar-50"))
    with pytest.raises(KeyError, match="unexpected \\['meta_net.weight'\\]"):
        trainer.load_model(str(tmp_path / "bad"), epoch=50)


def test_engine_clips_the_gradient_norm(make_trainer):
    steps = {}
    for max_norm in (0.0, 1e-3):
        trainer = make_trainer("CoOp", opts=TRAIN, **{"OPTIM.MAX_GRAD_NORM": max_norm})
        before = trainer.model.prompt_learner.ctx.detach().clone()
        trainer.set_model_mode("train")
        trainer.forward_backward(trainer.to_device(next(iter(trainer.train_loader_x))))
        steps[max_norm] = float((trainer.model.prompt_learner.ctx.detach() - before).norm())
    assert steps[1e-3] == pytest.approx(1e-3, rel=1e-3)  # SGD, lr 1, no momentum: the step is the clipped gradient
    assert steps[0.0] > 10 * steps[1e-3]


def test_init_weights_loads_a_checkpoint_into_the_prompt_learner(tmp_path, make_trainer):
    first = make_trainer("CoOp", tmp_path / "a", eval_only=True, opts=COOP)
    first.save_model(0, str(tmp_path / "a"))
    path = str(tmp_path / "a" / "prompt_learner" / "model.pth.tar-1")
    second = make_trainer("CoOp", tmp_path / "b", eval_only=True, opts=COOP, **{"MODEL.INIT_WEIGHTS": path, "SEED": 7})
    assert torch.equal(second.model.prompt_learner.ctx, first.model.prompt_learner.ctx)
