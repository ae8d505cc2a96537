"""MaPLe: with no prompts it is zero-shot CLIP, depth J reaches exactly blocks 0..J−1 of both towers, the vision
prompts are the projected text prompts of the same depth, and the trainable count matches methods.md §6."""

from __future__ import annotations

import pytest
import torch
from clip_fixtures import make_deep_backbone

import vltune  # noqa: F401  (compat shim: must precede open_clip/torchvision)

# isort: split

from vltune.clip import CLIPBackbone
from vltune.tuners.deep_prompts import CoupledPrompts, DeepPromptModel, DeepPrompts

NAMES = ["sea lion", "cat", "ice_cream cone"]
M = 2
MAPLE = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "DATALOADER.TEST.BATCH_SIZE": 16,
         "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05, "OPTIM.MAX_EPOCH": 1, "SEED": 1, "TRAINER.MAPLE.PROMPT_DEPTH": 2}


_CLIPS: dict[int, CLIPBackbone] = {}
# (blocks per tower, depth): the tiny CLIP's 2 blocks, and a 4-block CLIP with blocks after the prompted ones
DEPTHS = [(2, 1), (2, 2), (4, 1), (4, 2), (4, 3)]


def _shared_clip(layers: int) -> CLIPBackbone:
    if layers not in _CLIPS:
        _CLIPS[layers] = make_deep_backbone(layers, layers)
    return _CLIPS[layers]


def _model(clip, depth, ctx_init="a photo of a"):
    torch.manual_seed(1)
    return DeepPromptModel(clip, CoupledPrompts(clip, NAMES, M, ctx_init, depth)).eval()


# ---------------------------------------------------------------- no prompts = zero-shot CLIP
@torch.no_grad()
def test_no_prompts_gives_zero_shot_clip_logits(make_trainer):
    zs = make_trainer("ZeroshotCLIP", eval_only=True, weights="pretrained", opts=MAPLE)
    phrase = zs.template.split("{}")[0].strip()  # digits: "a photo of the number {}."
    assert f"{phrase} {{}}." == zs.template
    maple = make_trainer("MaPLe", eval_only=True, weights="pretrained", opts=MAPLE, **{
        "TRAINER.MAPLE.PROMPT_DEPTH": 0, "TRAINER.MAPLE.CTX_INIT": phrase})
    assert maple.n_trainable == 0
    images = next(iter(zs.test_loader))["img"][:8]
    expected = []
    for trainer in (zs, maple):
        trainer.set_model_mode("eval")
        trainer.before_evaluate()
        expected.append(trainer.model_inference(images))
        trainer.after_evaluate()
    torch.testing.assert_close(expected[1], expected[0], rtol=0, atol=1e-5)
    # The same path with P_0 trainable (depth 1, P_0 = the phrase's own first M tokens) keeps the text features:
    # P_0 takes the place of the phrase's tokens and receives their positional embedding.
    model = DeepPromptModel(maple.model.clip, CoupledPrompts(maple.model.clip, maple.classnames, M, phrase, 1))
    weights = maple.model.clip.zero_shot_classifier(maple.classnames, [zs.template])
    torch.testing.assert_close(model.text_features(), weights, rtol=0, atol=1e-5)
    # ... while the appended vision prompts do change the image features (the check above can fail).
    assert not torch.allclose(model.image_features(images), maple.model.image_features(images), atol=1e-4)


def test_the_image_path_trains_so_it_is_never_cached_as_frozen(make_trainer):
    """MaPLe's image features carry the coupled prompts: the trainer must not claim a frozen image path (the Skip
    plugin's cache would then freeze them)."""
    maple = make_trainer("MaPLe", opts=MAPLE)
    assert not maple.image_is_frozen()
    images = next(iter(maple.train_loader_x))["img"][:2]
    assert maple.image_features(images).requires_grad  # the prompts' gradient reaches the image features
    with pytest.raises(NotImplementedError, match="image path trains"):
        maple.frozen_image_features(images)


def test_depth_zero_is_eval_only_and_depth_must_fit_the_towers(make_trainer):
    with pytest.raises(ValueError, match="PROMPT_DEPTH"):
        make_trainer("MaPLe", opts=MAPLE, **{"TRAINER.MAPLE.PROMPT_DEPTH": 0})
    with pytest.raises(ValueError, match="exceeds the 2 blocks"):
        make_trainer("MaPLe", opts=MAPLE, **{"TRAINER.MAPLE.PROMPT_DEPTH": 3})
    with pytest.raises(ValueError, match="fewer than N_CTX"):
        make_trainer("MaPLe", opts=MAPLE, **{"TRAINER.MAPLE.CTX_INIT": "a", "TRAINER.MAPLE.N_CTX": 2})


# ---------------------------------------------------------------- depth J = exactly blocks 0..J-1
def _record(clip, model, tower):
    """Inputs and outputs of every block of ``tower`` during one forward, through torch module hooks."""
    blocks = (clip.model.transformer if tower == "text" else clip.model.visual.transformer).resblocks
    ins, outs, handles = [], [], []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda m, args, kw: ins.append(args[0].detach()),
                                                       with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, args, out: outs.append(out.detach())))
    try:
        with torch.no_grad():
            if tower == "text":
                model.text_features()
            else:
                model.image_features(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    return ins, outs


@pytest.mark.parametrize("layers,depth", DEPTHS)
def test_text_prompts_reach_exactly_the_first_depth_blocks(layers, depth):
    clip = _shared_clip(layers)
    model = _model(clip, depth)
    ins, outs = _record(clip, model, "text")
    prompts = model.prompt_learner.text_prompts()
    assert len(ins) == clip.n_layers_text and len(prompts) == depth
    pos = clip.model.positional_embedding[1:1 + M]
    fresh = prompts[0] + pos
    for i, x in enumerate(ins):
        slot = x[:, 1:1 + M]
        if i < depth:
            fresh = prompts[0] + pos if i == 0 else prompts[i]
            torch.testing.assert_close(slot, fresh.expand_as(slot).detach(), rtol=0, atol=0)
        if 0 < i < depth:  # freshly replaced: the previous block's tokens there are gone, the rest carried
            assert not torch.allclose(outs[i - 1][:, 1:1 + M], slot)
            torch.testing.assert_close(torch.cat([x[:, :1], x[:, 1 + M:]], 1),
                                       torch.cat([outs[i - 1][:, :1], outs[i - 1][:, 1 + M:]], 1), rtol=0, atol=0)
        if i >= depth:  # carried: exactly what the previous block produced
            torch.testing.assert_close(x, outs[i - 1], rtol=0, atol=0)
            assert not torch.allclose(slot, fresh.expand_as(slot))


@pytest.mark.parametrize("layers,depth", DEPTHS)
def test_vision_prompts_reach_exactly_the_first_depth_blocks(layers, depth):
    clip = _shared_clip(layers)
    model = _model(clip, depth)
    ins, outs = _record(clip, model, "image")
    vision = model.prompt_learner.vision_prompts()
    n_patches = (32 // 8) ** 2
    assert all(x.shape[1] == 1 + n_patches + M for x in ins)  # appended once, before block 0, kept afterwards
    for i, x in enumerate(ins):
        slot = x[:, -M:]
        if i == 0:
            expected = clip.model.visual.ln_pre(vision[0])
            torch.testing.assert_close(slot, expected.expand_as(slot).detach(), rtol=0, atol=0)
        elif i < depth:
            torch.testing.assert_close(slot, vision[i].expand_as(slot).detach(), rtol=0, atol=0)
            assert not torch.allclose(outs[i - 1][:, -M:], slot)
            torch.testing.assert_close(x[:, :-M], outs[i - 1][:, :-M], rtol=0, atol=0)
        else:
            torch.testing.assert_close(x, outs[i - 1], rtol=0, atol=0)
            assert not torch.allclose(slot, vision[-1].expand_as(slot))


def test_hooks_leave_blocks_beyond_the_prompts_alone():
    x = torch.randn(2, 7, 4)
    hooks = DeepPrompts(text=[torch.ones(2, 4)], vision=[torch.ones(2, 4)], ln_pre=torch.nn.Identity())
    assert hooks.before_block("text", 1, x) is x and hooks.before_block("image", 1, x) is x
    assert hooks.before_block("image", 0, x).shape == (2, 9, 4)
    assert torch.equal(hooks.before_block("text", 0, x)[:, 1:3], torch.ones(2, 2, 4))


# ---------------------------------------------------------------- coupling
def test_vision_prompts_are_the_projected_text_prompts_of_the_same_depth():
    clip = _shared_clip(4)
    model = _model(clip, 3)
    learner = model.prompt_learner
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = [v.clone() for v in learner.vision_prompts()]
        feats = model.image_features(images)
        learner.compound_prompts_text[0].add_(0.5)  # P_1, the text prompt of depth 1
        after = learner.vision_prompts()
        torch.testing.assert_close(after[1], learner.compound_prompt_projections[0](learner.compound_prompts_text[0]))
        assert not torch.allclose(after[1], before[1])
        for i in (0, 2):
            torch.testing.assert_close(after[i], before[i], rtol=0, atol=0)
        assert not torch.allclose(model.image_features(images), feats)  # the image tower sees the change
        learner.ctx.add_(0.5)  # P_0 reaches the image tower through F_0
        assert not torch.allclose(learner.vision_prompts()[0], before[0])


# ---------------------------------------------------------------- init
@pytest.mark.parametrize("ctx_init", ["a photo of a", ""])
def test_deeper_projections_start_as_clones_of_one_linear_drawn_after_the_deep_prompts(ctx_init):
    """Upstream ``MultiModalPromptLearner``: ``proj`` (F_0) is its own Linear; F_1..F_{J−1} are copies of one further
    ``single_layer`` Linear made after the deep text prompts. Same seed, same draws in upstream's order."""
    clip = _shared_clip(4)
    depth, d_t, d_v = 4, clip.width_text, clip.width_image
    torch.manual_seed(3)
    learner = CoupledPrompts(clip, NAMES, M, ctx_init, depth)
    after = torch.rand(1)
    deep = list(learner.compound_prompt_projections)
    assert len(deep) == depth - 1
    for f in deep[1:]:
        assert f is not deep[0] and f.weight is not deep[0].weight  # separate tensors that train apart
        assert torch.equal(f.weight, deep[0].weight) and torch.equal(f.bias, deep[0].bias)
    same_as_f0 = torch.allclose(deep[0].weight, learner.proj.weight) or torch.allclose(deep[0].bias, learner.proj.bias)
    assert not same_as_f0, "F_1..F_{J-1} start as copies of F_0; upstream clones a Linear of their own"
    torch.manual_seed(3)  # upstream's order of draws: [random P_0], F_0, P_1..P_{J−1}, single_layer
    ctx = None if ctx_init else torch.empty(M, d_t).normal_(std=0.02)
    f0 = torch.nn.Linear(d_t, d_v)
    prompts = [torch.empty(M, d_t).normal_(std=0.02) for _ in range(depth - 1)]
    single = torch.nn.Linear(d_t, d_v)
    if ctx is not None:
        torch.testing.assert_close(learner.ctx.data, ctx, rtol=0, atol=0)
    torch.testing.assert_close(learner.proj.weight.data, f0.weight.data, rtol=0, atol=0)
    for p, q in zip(learner.compound_prompts_text, prompts):
        torch.testing.assert_close(p.data, q, rtol=0, atol=0)
    torch.testing.assert_close(deep[0].weight.data, single.weight.data, rtol=0, atol=0)
    torch.testing.assert_close(deep[-1].bias.data, single.bias.data, rtol=0, atol=0)
    assert torch.equal(after, torch.rand(1))  # nothing else drawn: what follows (DePT's head) sees upstream's stream
    torch.manual_seed(3)  # depth 1 still draws single_layer (cloned zero times), as upstream
    CoupledPrompts(clip, NAMES, M, "a photo of a", 1)
    after = torch.rand(1)
    torch.manual_seed(3)
    torch.nn.Linear(d_t, d_v), torch.nn.Linear(d_t, d_v)
    assert torch.equal(after, torch.rand(1))


def test_trainable_count_on_vit_b16_widths():
    """methods.md §6: M = 2, J = 9, D_t 512 → D_v 768 gives 3,555,072 parameters."""
    tiny = _shared_clip(2)

    class Widths:  # the learner only needs the tokenizer, token embeddings and widths
        width_text, width_image = 512, 768
        tokenize, eot_index, cut_text = tiny.tokenize, tiny.eot_index, tiny.cut_text

        @staticmethod
        def token_embedding(ids):
            return torch.zeros(*ids.shape, 512)

    learner = CoupledPrompts(Widths(), NAMES, 2, "a photo of a", 9)
    assert sum(p.numel() for p in learner.parameters()) == 3_555_072
    assert len(learner.text_prompts()) == len(learner.vision_prompts()) == 9
    assert {k for k in learner.state_dict()} >= {"ctx", "proj.weight", "compound_prompts_text.7",
                                                  "compound_prompt_projections.7.bias"}
    assert "token_prefix" not in learner.state_dict()  # rebuilt from the class names, never saved
