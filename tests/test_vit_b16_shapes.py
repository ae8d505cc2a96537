"""The real ViT-B/16 architecture (random weights: none can be downloaded here) has the sizes the reference docs
record, so the Dassl name maps to OpenAI's model and CoOp's parameter count matches the paper's."""

from __future__ import annotations

import pytest
import torch

from vltune.clip import CLIPBackbone, create_clip, resolve_arch
from vltune.tuners.prompting import PromptLearner, PromptModel


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return CLIPBackbone(create_clip("ViT-B/16"), arch=resolve_arch("ViT-B/16"))


def test_vit_b16_sizes_match_openai(vit_b16):
    assert sum(p.numel() for p in vit_b16.parameters()) == 149_620_737  # methods.md §0.1 / ARCHITECTURE.md
    assert (vit_b16.width_text, vit_b16.width_image, vit_b16.embed_dim) == (512, 768, 512)
    assert (vit_b16.n_layers_text, vit_b16.n_layers_image, vit_b16.image_size, vit_b16.context_length) == (
        12, 12, 224, 77)
    tokens = vit_b16.embed_image(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 197, 768)
    assert vit_b16.tokenize(["a photo of a cat."])[0, :9].tolist() == [49406, 320, 1125, 539, 320, 2368, 269,
                                                                        49407, 0]  # dassl_contract.md §10


def test_coop_on_vit_b16_has_8192_parameters_and_class_logits(vit_b16):
    names = ["cat", "sea lion", "golden retriever"]
    learner = PromptLearner(vit_b16, names, 16, "", False, "end")
    assert learner.ctx.numel() == 8192  # methods.md §2: M = 16, generic context
    model = PromptModel(vit_b16, learner)
    with torch.no_grad():
        logits = vit_b16.similarity(model.image_features(torch.randn(2, 3, 224, 224)), model.text_features())
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_finetune_and_skip_tuning_train_the_documented_parameter_counts(vit_b16):
    from trainers.ftclip import frozen_names

    def trainable(start_layer: int) -> int:
        frozen = frozen_names(vit_b16, set(), start_layer, True, True)
        return sum(p.numel() for n, p in vit_b16.named_parameters() if n not in frozen)

    assert trainable(0) == 123_540_992  # methods.md §12: about 123.5 M of 149,620,737 (FT-CLIP)
    assert trainable(6) == 62_099_456  # methods.md §13.1: about 62.1 M for ω = 6 (Skip Tuning)
