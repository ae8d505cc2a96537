"""The Res-Tuning CLIP trainers: exactly frozen CLIP at step 0, the bypass keeps the backbone out of autograd, the
CLS/EOT-only bypass equals the all-token one, the in-block branches are parallel to the frozen operations, and
``PROMPT_GATE`` False is the paper's ungated Res-Prompt branch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import eval_logits

import vltune  # noqa: F401  (compat shim: must precede open_clip/torchvision)

# isort: split
from open_clip.model import CLIP

from vltune.tuners.res_tuners import FrozenAttention, build_tuner

NAMES = ["ResAdapter", "ResPrefix", "ResPrompt", "ResTuningBypass"]
RESTUNING = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "OPTIM.NAME": "sgd", "OPTIM.LR": 0.5,
             "OPTIM.MAX_EPOCH": 1, "SEED": 1}


def _frozen_logits(trainer, images):
    clip = trainer.backbone
    with torch.no_grad():
        text = clip.zero_shot_classifier(trainer.classnames, [trainer.template])
        return clip.logit_scale * F.normalize(clip.encode_image(images), dim=-1) @ text.t()


def _steps(trainer, n=2):
    trainer.set_model_mode("train")
    batches = iter(trainer.train_loader_x)
    for _ in range(n):
        trainer.forward_backward(trainer.to_device(next(batches)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("towers", ["('image',)", "('image', 'text')"])
def test_step_zero_is_exactly_frozen_clip_and_training_moves_away(name, towers, make_trainer):
    trainer = make_trainer(name, opts=RESTUNING, **{"TRAINER.RESTUNING.TOWERS": towers})
    images = next(iter(trainer.test_loader))["img"][:6]
    frozen = _frozen_logits(trainer, images)
    torch.testing.assert_close(eval_logits(trainer, images), frozen, rtol=1e-5, atol=1e-5)
    _steps(trainer)
    assert not torch.allclose(eval_logits(trainer, images), frozen, atol=1e-4)


@pytest.mark.parametrize("recurrence", ["paper", "swift"])
def test_paper_and_swift_recurrences_replace_the_features(recurrence, make_trainer):
    trainer = make_trainer("ResTuningBypass", opts=RESTUNING, **{"TRAINER.RESTUNING.RECURRENCE": recurrence})
    images = next(iter(trainer.test_loader))["img"][:6]
    assert not torch.allclose(eval_logits(trainer, images), _frozen_logits(trainer, images), atol=1e-3)


def _block_outputs(trainer):
    """Activations inside every block of both towers (``ln_2`` runs whether a block runs whole or piecewise)."""
    outputs = []
    blocks = [*trainer.backbone.model.visual.transformer.resblocks, *trainer.backbone.model.transformer.resblocks]
    handles = [b.ln_2.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in blocks]
    return outputs, handles


def test_bypass_keeps_backbone_activations_out_of_the_graph(make_trainer):
    trainer = make_trainer("ResTuningBypass", opts=RESTUNING, **{"TRAINER.RESTUNING.TOWERS": "('image', 'text')"})
    outputs, handles = _block_outputs(trainer)
    batch = trainer.to_device(next(iter(trainer.train_loader_x)))
    trainer.set_model_mode("train")
    loss, _ = trainer.loss(batch)
    loss.backward()
    for h in handles:
        h.remove()
    assert outputs and all(o.grad_fn is None and not o.requires_grad for o in outputs)
    assert all(p.grad is None for p in trainer.backbone.parameters())
    assert all(p.grad is not None for p in trainer.model["tuners"].parameters())


def test_in_block_adapter_trains_through_the_frozen_blocks(make_trainer):
    trainer = make_trainer("ResAdapter", opts=RESTUNING)
    outputs, handles = _block_outputs(trainer)
    trainer.set_model_mode("train")
    trainer.loss(trainer.to_device(next(iter(trainer.train_loader_x))))
    for h in handles:
        h.remove()
    assert any(o.grad_fn is not None for o in outputs)  # the contrast: in-backbone tuners need the backbone's graph


def test_bypass_on_the_cls_token_equals_the_bypass_on_every_token(make_trainer):
    trainer = make_trainer("ResTuningBypass", opts=RESTUNING)
    _steps(trainer)  # non-zero tuners
    clip, chain = trainer.backbone, trainer.model["tuners"]["image"]
    images = next(iter(trainer.test_loader))["img"][:4]
    with torch.no_grad():
        x = clip.embed_image(images)
        root, stems = x, []
        for i in range(clip.n_layers_image):
            x = clip.image_blocks(x, i, i + 1)
            stems.append(x)
        every_token = clip.image_head(stems[-1] + chain(root, stems))
        torch.testing.assert_close(trainer._image_bypass(images), every_token, rtol=1e-5, atol=1e-6)


def test_text_bypass_runs_the_frozen_text_tower_once_per_class_set(make_trainer):
    trainer = make_trainer("ResTuningBypass", opts=RESTUNING, **{"TRAINER.RESTUNING.TOWERS": "('text',)"})
    calls = []
    handle = trainer.backbone.model.transformer.resblocks[0].register_forward_hook(lambda *_: calls.append(1))
    _steps(trainer, 3)
    handle.remove()
    assert len(calls) == 1


def test_bad_settings_fail_naming_the_key(make_trainer):
    with pytest.raises(ValueError, match=r"TRAINER.RESTUNING.TOWERS \['image', 'audio'\]: choose from image, text"):
        make_trainer("ResAdapter", opts=RESTUNING, **{"TRAINER.RESTUNING.TOWERS": "('image', 'audio')"})
    with pytest.raises(ValueError, match="TRAINER.RESTUNING.LATERAL"):
        make_trainer("ResTuningBypass", opts=RESTUNING, **{"TRAINER.RESTUNING.LATERAL": "lora"})


@pytest.mark.parametrize(("lateral", "vertical"), [("res_prefix", "res_prompt"), ("res_prompt", "zero")])
def test_prefix_and_prompt_tuners_also_serve_in_the_bypass(lateral, vertical, make_trainer):
    trainer = make_trainer("ResTuningBypass", opts=RESTUNING,
                           **{"TRAINER.RESTUNING.LATERAL": lateral, "TRAINER.RESTUNING.VERTICAL": vertical})
    images = next(iter(trainer.test_loader))["img"][:6]
    frozen = _frozen_logits(trainer, images)
    torch.testing.assert_close(eval_logits(trainer, images), frozen, rtol=1e-5, atol=1e-5)
    _steps(trainer, 3)
    assert not torch.allclose(eval_logits(trainer, images), frozen, atol=1e-4)
    assert all(p.grad is None for p in trainer.backbone.parameters())


# ---- Res-Prompt's gate (vltune's addition) and the paper's ungated form -------------------------------------------
def _paper_prompt_branch(block, prompts, h):
    """The paper's Res-Prompt branch, written out: per head softmax(Q K_pᵀ/√d_h) V_p, heads concatenated, times W_oᵀ,
    with Q = h W_qᵀ + b_q and K_p, V_p = ln_1(P) W_kᵀ + b_k, ln_1(P) W_vᵀ + b_v from the block's frozen weights."""
    attn = block.attn
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    p = block.ln_1(prompts)
    q, k, v = h @ w_q.T + b_q, p @ w_k.T + b_k, p @ w_v.T + b_v
    heads, d_h = attn.num_heads, h.shape[-1] // attn.num_heads
    out = []
    for i in range(heads):
        cols = slice(i * d_h, (i + 1) * d_h)
        weights = torch.softmax(q[..., cols] @ k[:, cols].T / d_h ** 0.5, dim=-1)
        out.append(weights @ v[:, cols])
    return torch.cat(out, dim=-1) @ attn.out_proj.weight.T


def test_ungated_res_prompt_is_the_papers_branch(make_trainer):
    gated = make_trainer("ResPrompt", opts=RESTUNING)
    paper = make_trainer("ResPrompt", opts=RESTUNING, **{"TRAINER.RESTUNING.PROMPT_GATE": False})
    assert gated.n_trainable == 2 * (10 * 64 + 64) and paper.n_trainable == 2 * 10 * 64  # nD + D vs nD per block
    block = paper.backbone.model.visual.transformer.resblocks[1]
    tuner = paper.model["tuners"]["image"]["attn"][1]
    assert tuner.gate is None and gated.model["tuners"]["image"]["attn"][1].gate.count_nonzero() == 0
    h = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = _paper_prompt_branch(block, tuner.prompts, h)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(tuner(h), expected, rtol=1e-5, atol=1e-6)
        gated_tuner = gated.model["tuners"]["image"]["attn"][1]
        gated_tuner.prompts.copy_(tuner.prompts)
        gated_tuner.gate.fill_(1.0)  # the gate is the only difference
        torch.testing.assert_close(gated_tuner(h), tuner(h), rtol=0, atol=0)
    images = next(iter(paper.test_loader))["img"][:6]  # documented: the paper's form is not frozen CLIP at step 0
    assert not torch.allclose(eval_logits(paper, images), _frozen_logits(paper, images), atol=1e-4)


def test_ungated_res_prompt_splits_heads_like_the_paper():
    torch.manual_seed(0)  # the tiny CLIP has one head; this block has 4 (d_h = 16)
    clip = CLIP(64, dict(image_size=32, layers=1, width=64, patch_size=8, head_width=16),
                dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=1))
    block = clip.visual.transformer.resblocks[0]
    assert block.attn.num_heads == 4
    tuner = build_tuner({"res_prompt": {"gate": False, "n_tokens": 5}}, 64, residual=False, zero_init=True,
                        attn=FrozenAttention(block.attn), norm=block.ln_1)
    h = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(tuner(h), _paper_prompt_branch(block, tuner.prompts, h), rtol=1e-5, atol=1e-6)


def test_ungated_res_prompt_in_the_bypass_needs_a_replacing_recurrence(make_trainer):
    with pytest.raises(ValueError, match=r"TRAINER\.RESTUNING\.VERTICAL 'res_prompt' \(PROMPT_GATE False\) is refused "
                                         r"with RECURRENCE identity: .*set TRAINER\.RESTUNING\.PROMPT_GATE True"):
        make_trainer("ResTuningBypass", opts=RESTUNING,
                     **{"TRAINER.RESTUNING.VERTICAL": "res_prompt", "TRAINER.RESTUNING.PROMPT_GATE": False})
    trainer = make_trainer("ResTuningBypass", opts=RESTUNING,
                           **{"TRAINER.RESTUNING.LATERAL": "res_prompt", "TRAINER.RESTUNING.PROMPT_GATE": False,
                              "TRAINER.RESTUNING.RECURRENCE": "paper"})
    assert all(t.gate is None for t in trainer.model["tuners"]["image"].lateral)
    _steps(trainer)
    assert all(p.grad is None for p in trainer.backbone.parameters())
