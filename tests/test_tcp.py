"""TCP: the class-aware tokens are the only difference from CoOp, reach exactly the configured text block, the
knowledge loss vanishes on the hand-crafted prompt, and unseen classes get tokens from their own text embeddings."""

from __future__ import annotations

import pytest
import torch
from clip_fixtures import make_deep_backbone

import vltune  # noqa: F401  (compat shim: must precede open_clip/torchvision)

# isort: split

from trainers.tcp import TCPModel, TCPPromptLearner, learnable_tail
from vltune.clip import CLIPBackbone, create_clip, resolve_arch
from vltune.engine.checkpoint import atomic_torch_save
from vltune.tuners.prompting import knowledge_loss

NAMES = ["sea lion", "cat", "ice_cream cone"]
TINY = {"TRAINER.COOP.N_CTX": 4, "TRAINER.TCP.INJECT_LAYER": 1}  # vltune-tiny has 2 text blocks
TCP = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "DATALOADER.TEST.BATCH_SIZE": 16,
       "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05, "OPTIM.MAX_EPOCH": 1, "SEED": 1, **TINY}


def _steps(trainer, n=3):
    trainer.set_model_mode("train")
    batches = iter(trainer.train_loader_x)
    return [trainer.forward_backward(trainer.to_device(next(batches))) for _ in range(n)]


@pytest.fixture(scope="module")
def deep_clip():
    """A random CLIP with 4 text blocks, so that blocks before, at and after the injection layer all exist."""
    return make_deep_backbone(4, 1)


def _learner(clip, names=NAMES, ctx_init=""):
    learner = TCPPromptLearner(clip, names, 4, ctx_init, "{}, a type of thing.")
    learner.class_text = clip.zero_shot_classifier(names, ["a photo of a {}."]).float()  # TCP.build_teachers' job
    return learner


def test_without_injection_text_features_equal_coops_with_the_same_context(make_trainer):
    coop = make_trainer("CoOp", eval_only=True, opts=TCP)
    features = {}
    for weight in (0.0, 1.0):
        tcp = make_trainer("TCP", eval_only=True, opts=TCP, **{"TRAINER.TCP.MIX_WEIGHT": weight})
        with torch.no_grad():
            coop.model.prompt_learner.ctx.copy_(tcp.model.prompt_learner.ctx)
            features[weight] = tcp.model.text_features(), coop.model.text_features()
    # Digits' template "a photo of the number {}." gives the tail "{}.": the same prompts as CoOp's "X X X X {}."
    torch.testing.assert_close(*features[0.0], rtol=0, atol=1e-6)
    assert (features[1.0][0] - features[1.0][1]).abs().max() > 1e-2  # the injected tokens are the one difference


def _block_inputs(clip, model):
    """The (C, L, D) input of every text block during ``model.text_features()``, read by torch pre-hooks."""
    inputs, handles = {}, []
    for i, block in enumerate(clip.model.transformer.resblocks):
        handles.append(block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].clone())))
    try:
        with torch.no_grad():
            model.text_features()
    finally:
        for h in handles:
            h.remove()
    return inputs


@pytest.mark.parametrize("layer,weight", [(2, 1.0), (0, 1.0), (3, 1.0), (2, 0.25)])
def test_class_aware_tokens_reach_exactly_the_injection_layer(deep_clip, layer, weight):
    learner = _learner(deep_clip)
    with torch.no_grad():
        u = learner.class_tokens()
    seen = _block_inputs(deep_clip, TCPModel(deep_clip, learner, layer, weight))
    plain = _block_inputs(deep_clip, TCPModel(deep_clip, learner, layer, 0.0))  # CoOp's forward: no injection
    for i in range(deep_clip.n_layers_text):
        ctx_slots = seen[i][:, 1:5]
        if i < layer:  # nothing of the TKE has entered yet
            torch.testing.assert_close(seen[i], plain[i], rtol=0, atol=0)
            assert not torch.allclose(ctx_slots, u, atol=1e-3)
        elif i == layer:  # positions 1..M are mixed with u, every other position is untouched
            torch.testing.assert_close(ctx_slots, weight * u + (1 - weight) * plain[i][:, 1:5], rtol=0, atol=1e-6)
            torch.testing.assert_close(seen[i][:, :1], plain[i][:, :1], rtol=0, atol=0)
            torch.testing.assert_close(seen[i][:, 5:], plain[i][:, 5:], rtol=0, atol=0)
        else:  # later blocks run on what the injection produced
            assert not torch.allclose(seen[i], plain[i], atol=1e-4)


def test_knowledge_loss_is_zero_when_the_prompt_is_the_hand_crafted_one(make_trainer):
    # Digits' template is "a photo of the number {}.": this context reproduces it token for token.
    hand = {"TRAINER.COOP.CTX_INIT": "a photo of the number", "TRAINER.COOP.W": 8.0}
    trainer = make_trainer("TCP", eval_only=True, opts=TCP, **hand, **{"TRAINER.TCP.MIX_WEIGHT": 0.0})
    batch = trainer.to_device(next(iter(trainer.test_loader)))
    with torch.no_grad():
        parts = trainer.forward_parts(batch["img"])
        w = trainer.model.prompt_learner.class_text
        torch.testing.assert_close(w, trainer.model.clip.zero_shot_classifier(trainer.classnames, [trainer.template]))
        torch.testing.assert_close(parts.text, w, rtol=0, atol=1e-5)
        assert abs(float(trainer.regularizers(batch, parts)["kg"])) < 1e-5
        injected = make_trainer("TCP", eval_only=True, opts=TCP, **hand)
        parts = injected.forward_parts(batch["img"])
        kg = knowledge_loss(parts.text, injected.model.prompt_learner.class_text)
        assert 1e-3 < float(kg) <= 2.0  # 1 - mean cos lies in [0, 2]
        torch.testing.assert_close(injected.regularizers(batch, parts)["kg"], 8.0 * kg)
    assert float(knowledge_loss(-w, w)) == pytest.approx(2.0, abs=1e-5)


def test_unseen_classes_get_class_aware_tokens_from_their_own_embeddings(tmp_path, make_trainer):
    base = make_trainer("TCP", tmp_path / "base", opts=TCP, **{"DATASET.SUBSAMPLE_CLASSES": "base"})
    _steps(base, 2)
    base.save_model(0, str(tmp_path / "base"))
    new = make_trainer("TCP", tmp_path / "new", eval_only=True, opts=TCP, **{"DATASET.SUBSAMPLE_CLASSES": "new"})
    new.load_model(str(tmp_path / "base"), epoch=1)
    assert not set(new.classnames) & set(base.classnames)
    learner = new.model.prompt_learner
    for key, value in base.model.prompt_learner.meta_net.state_dict().items():
        assert torch.equal(learner.meta_net.state_dict()[key], value)  # the trained TKE
    with torch.no_grad():
        w_new = new.model.clip.zero_shot_classifier(new.classnames, [new.template]).float()
        tokens = learner.class_tokens()
        torch.testing.assert_close(learner.class_text, w_new)
        torch.testing.assert_close(tokens, learner.meta_net(w_new).view(len(new.classnames), 4, -1))
    assert tokens.shape == (new.num_classes, 4, 64) and torch.isfinite(tokens).all()
    flat = tokens.flatten(1)
    assert torch.cdist(flat, flat)[~torch.eye(len(flat), dtype=torch.bool)].min() > 1e-4  # one prompt per class
    assert new.test() >= 0.0 and new.last_metrics["accuracy"] >= 0.0


def test_checkpoint_keys_match_upstream_and_prompt_buffers_are_ignored(tmp_path, make_trainer):
    trainer = make_trainer("TCP", tmp_path / "run", eval_only=True, opts=TCP)
    state = trainer.trainable_state("prompt_learner")
    assert set(state) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                          "meta_net.linear2.bias"}
    upstream = {k: torch.randn_like(v).half() for k, v in state.items()}
    upstream |= {"token_prefix": torch.zeros(5, 1, 64).half(), "token_suffix": torch.zeros(5, 72, 64).half()}
    path = tmp_path / "upstream" / "prompt_learner" / "model.pth.tar-50"
    atomic_torch_save({"state_dict": upstream, "epoch": 50}, str(path))
    trainer.load_model(str(tmp_path / "upstream"), epoch=50)
    loaded = trainer.model.prompt_learner.meta_net.linear2.bias.data
    assert torch.equal(loaded, upstream["meta_net.linear2.bias"].float())


def test_learnable_template_follows_upstream():
    assert learnable_tail("OxfordPets", "a photo of a {}, a type of pet.") == "{}, a type of pet."
    assert learnable_tail("DescribableTextures", "{} texture.") == "{} texture."
    assert learnable_tail("EuroSAT", "a centered satellite photo of {}.") == "{}."
    assert learnable_tail("StanfordCars", "a photo of a {}.") == "{}, a type of car"
    assert learnable_tail("UCF101", "a photo of a person doing {}.") == "person doing {}."


def test_prompt_layout_puts_context_first_and_upstreams_ucf101_prompt_after_it(deep_clip):
    names = ["Apply_Eye Makeup"]
    learner = TCPPromptLearner(deep_clip, names, 4, "", learnable_tail("UCF101", "a photo of a person doing {}."))
    prompts, eot = learner()
    torch.testing.assert_close(prompts[0, 1:5], learner.ctx, rtol=0, atol=0)
    # upstream tokenises "a photo of a person doing {}." and lets the 4 context vectors take its first 4 tokens
    ids = deep_clip.tokenize(["a photo of a person doing apply eye makeup."])
    assert int(eot[0]) == int(deep_clip.eot_index(ids)[0])
    torch.testing.assert_close(prompts[0, 5:], deep_clip.token_embedding(ids[:, 5:int(eot[0]) + 1])[0], rtol=0, atol=0)


@pytest.mark.parametrize("opts,match", [({"TRAINER.TCP.INJECT_LAYER": 2}, "outside the 2 text blocks"),
                                        ({"TRAINER.TCP.MIX_WEIGHT": 1.5}, r"MIX_WEIGHT must lie in \[0, 1\]"),
                                        ({"TRAINER.COOP.CSC": True}, "generic context"),
                                        ({"TRAINER.COOP.CLASS_TOKEN_POSITION": "middle"}, "must be 'end'")])
def test_bad_settings_are_rejected(opts, match, make_trainer):
    with pytest.raises(ValueError, match=match):
        make_trainer("TCP", eval_only=True, opts=TCP, **opts)


def test_vit_b16_has_331904_trainable_parameters_and_injects_at_block_8():
    torch.manual_seed(0)
    clip = CLIPBackbone(create_clip("ViT-B/16"), arch=resolve_arch("ViT-B/16"))
    learner = _learner(clip, ["cat", "sea lion"])
    assert sum(p.numel() for p in learner.parameters()) == 331_904  # methods.md §8: 2,048 ctx + 329,856 TKE
    seen = _block_inputs(clip, TCPModel(clip, learner, 8, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(seen[8][:, 1:5], learner.class_tokens(), rtol=0, atol=0)
    assert not torch.allclose(seen[7][:, 1:5], seen[8][:, 1:5], atol=1e-3)
