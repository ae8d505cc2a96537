"""CLIPBackbone on a random tiny CLIP: equals open_clip, truncation/caching/hooks are exact, zero-shot weights."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import vltune  # noqa: F401  (compat shim: must precede open_clip/torchvision)

# isort: split
from clip_fixtures import TINY_RN, make_tiny_backbone
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from vltune.clip import (
    IMAGENET_TEMPLATES,
    IMAGENET_TEMPLATES_SELECT,
    BlockHooks,
    CLIPBackbone,
)

ATOL = 1e-5
PROMPTS = [
    "a photo of a cat.",
    "x",
    "a centered satellite photo of annual crop land, seen from far above the ground.",
    "a photo of a golden retriever, a type of pet.",
]


@pytest.fixture(scope="module")
def backbone() -> CLIPBackbone:
    return make_tiny_backbone(seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ids(backbone: CLIPBackbone) -> torch.Tensor:
    return backbone.tokenize(PROMPTS)


class Recorder(BlockHooks):
    """Counts calls per (tower, where, block), records sequence lengths and adds ``shift`` after every block.

    The shift varies over channels: a uniform one would be removed by the next LayerNorm and change nothing.
    """

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift
        self.calls: Counter = Counter()
        self.lengths: list[int] = []

    def before_block(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        self.calls[(tower, "before", i)] += 1
        self.lengths.append(x.shape[1])
        return x

    def after_block(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        self.calls[(tower, "after", i)] += 1
        return x + self.shift * torch.linspace(-1.0, 1.0, x.shape[-1])


class AppendTokens(BlockHooks):
    """Appends ``tokens`` (n, D) to the sequence before block ``at`` of ``tower`` (VPT-style deep prompts)."""

    def __init__(self, tower: str, at: int, tokens: torch.Tensor) -> None:
        self.tower, self.at, self.tokens = tower, at, tokens

    def before_block(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        if tower != self.tower or i != self.at:
            return x
        return torch.cat([x, self.tokens.expand(x.shape[0], -1, -1)], dim=1)


@torch.no_grad()
def test_matches_open_clip(backbone: CLIPBackbone, images: torch.Tensor, ids: torch.Tensor) -> None:
    model = backbone.model
    assert torch.allclose(backbone.encode_image(images), model.encode_image(images), atol=ATOL)
    assert torch.allclose(backbone.encode_text(ids), model.encode_text(ids), atol=ATOL)
    assert torch.allclose(backbone.encode_text(ids, truncate=False), model.encode_text(ids), atol=ATOL)
    normed = backbone.encode_image(images, normalize=True)
    assert torch.allclose(normed, model.encode_image(images, normalize=True), atol=ATOL)


@torch.no_grad()
def test_truncation_is_exact_and_really_shortens(backbone: CLIPBackbone, ids: torch.Tensor) -> None:
    eot = backbone.eot_index(ids)
    recorder = Recorder()
    truncated = backbone.encode_text(ids, hooks=recorder)
    assert set(recorder.lengths) == {int(eot.max()) + 1} and int(eot.max()) + 1 < backbone.context_length
    assert torch.allclose(truncated, backbone.encode_text(ids, truncate=False), atol=ATOL)
    chunked = backbone.encode_text(ids, batch_size=1)  # every chunk cut to its own length
    assert torch.allclose(chunked, truncated, atol=ATOL)
    assert backbone.cut_text(ids, eot).shape[1] == int(eot.max()) + 1


@torch.no_grad()
def test_truncate_text_off_runs_every_context_position(backbone: CLIPBackbone, ids: torch.Tensor) -> None:
    backbone.truncate_text = False
    try:
        recorder = Recorder()
        full = backbone.encode_text(ids, hooks=recorder)
        assert set(recorder.lengths) == {backbone.context_length}
        assert backbone.cut_text(ids, backbone.eot_index(ids)).shape[1] == backbone.context_length
    finally:
        backbone.truncate_text = True
    assert torch.allclose(full, backbone.encode_text(ids), atol=ATOL)


def test_tokenize_and_eot(backbone: CLIPBackbone) -> None:
    ids = backbone.tokenize(["a photo of a cat."])
    assert ids.shape == (1, 77) and ids.dtype == torch.int64
    assert ids[0, :9].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0]
    assert backbone.eot_index(ids).tolist() == [7]


@torch.no_grad()
def test_encode_from_embeddings_equals_encode_text(backbone: CLIPBackbone, ids: torch.Tensor) -> None:
    eot = backbone.eot_index(ids)
    embeds = backbone.token_embedding(ids)
    assert embeds.shape == (len(PROMPTS), 77, backbone.width_text)
    assert torch.allclose(backbone.encode_text_from_embeddings(embeds, eot), backbone.encode_text(ids), atol=ATOL)
    manual = backbone.text_head(backbone.text_blocks(backbone.embed_text(ids), 0, backbone.n_layers_text), eot)
    assert torch.allclose(manual, backbone.encode_text(ids), atol=ATOL)


def test_prompt_embeddings_get_gradients(backbone: CLIPBackbone, ids: torch.Tensor) -> None:
    embeds = backbone.token_embedding(ids).detach().requires_grad_(True)  # CoOp's learnable context
    backbone.encode_text_from_embeddings(embeds, backbone.eot_index(ids), normalize=True).sum().backward()
    assert embeds.grad is not None and embeds.grad[:, 1:4].abs().sum() > 0


@torch.no_grad()
def test_mid_layer_cache(backbone: CLIPBackbone, images: torch.Tensor) -> None:
    full = backbone.encode_image(images)
    n = backbone.n_layers_image
    x0 = backbone.embed_image(images)
    assert x0.shape == (3, 1 + (32 // 8) ** 2, backbone.width_image)
    for k in range(n + 1):
        cached = backbone.image_blocks(x0, 0, k)
        assert torch.allclose(backbone.image_head(backbone.image_blocks(cached, k, n)), full, atol=ATOL)


@torch.no_grad()
def test_hooks_are_called_once_per_block(backbone: CLIPBackbone, images: torch.Tensor, ids: torch.Tensor) -> None:
    recorder = Recorder(shift=0.0)
    assert torch.allclose(backbone.encode_image(images, hooks=recorder), backbone.encode_image(images), atol=ATOL)
    assert torch.allclose(backbone.encode_text(ids, hooks=recorder), backbone.encode_text(ids), atol=ATOL)
    expected = {
        (tower, where, i): 1
        for tower, n in (("image", backbone.n_layers_image), ("text", backbone.n_layers_text))
        for where in ("before", "after")
        for i in range(n)
    }
    assert dict(recorder.calls) == expected

    shifted = Recorder(shift=0.5)
    assert not torch.allclose(backbone.encode_image(images, hooks=shifted), backbone.encode_image(images), atol=1e-3)
    assert not torch.allclose(backbone.encode_text(ids, hooks=shifted), backbone.encode_text(ids), atol=1e-3)


@torch.no_grad()
def test_block_range_checked(backbone: CLIPBackbone, images: torch.Tensor) -> None:
    x = backbone.embed_image(images)
    with pytest.raises(ValueError, match="outside"):
        backbone.image_blocks(x, 1, backbone.n_layers_image + 1)
    with pytest.raises(ValueError, match="outside"):
        backbone.text_blocks(x, 2, 1)


@torch.no_grad()
def test_before_hook_appends_image_tokens(backbone: CLIPBackbone, images: torch.Tensor) -> None:
    tokens = torch.randn(1, 4, backbone.width_image, generator=torch.Generator().manual_seed(2))
    hooked = backbone.encode_image(images, hooks=AppendTokens("image", 1, tokens))
    assert hooked.shape == (3, backbone.embed_dim)
    x = backbone.image_blocks(backbone.embed_image(images), 0, 1)
    x = torch.cat([x, tokens.expand(3, -1, -1)], dim=1)
    manual = backbone.image_head(backbone.image_blocks(x, 1, backbone.n_layers_image))
    assert torch.allclose(hooked, manual, atol=ATOL)
    assert not torch.allclose(hooked, backbone.encode_image(images), atol=1e-3)  # the prompts are attended to


@torch.no_grad()
def test_text_mask_follows_appended_tokens(backbone: CLIPBackbone, ids: torch.Tensor) -> None:
    # Tokens appended after the EOT must not change the EOT feature: the causal mask has to grow with the sequence.
    tokens = torch.randn(1, 5, backbone.width_text, generator=torch.Generator().manual_seed(3))
    hooked = backbone.encode_text(ids, hooks=AppendTokens("text", 1, tokens))
    assert torch.allclose(hooked, backbone.encode_text(ids), atol=ATOL)
    full_length = backbone.encode_text(ids, hooks=AppendTokens("text", 0, tokens), truncate=False)  # 77 + 5 > 77
    assert torch.allclose(full_length, backbone.encode_text(ids), atol=ATOL)


@torch.no_grad()
def test_zero_shot_classifier(backbone: CLIPBackbone) -> None:
    classnames = ["golden_retriever", "cat", "annual crop land", "airliner", "sea_lion"]
    templates = IMAGENET_TEMPLATES_SELECT
    weights = backbone.zero_shot_classifier(classnames, templates)
    assert weights.shape == (5, backbone.embed_dim) and weights.dtype == backbone.dtype
    assert torch.allclose(weights.norm(dim=-1), torch.ones(5), atol=1e-5)
    for c, name in enumerate(classnames):
        prompts = [t.format(name.replace("_", " ")) for t in templates]
        feats = backbone.model.encode_text(backbone.tokenize(prompts), normalize=True)
        assert torch.allclose(weights[c], F.normalize(feats.mean(dim=0), dim=-1), atol=ATOL)
    assert torch.allclose(backbone.zero_shot_classifier(classnames, templates, batch_size=3), weights, atol=ATOL)

    single = backbone.zero_shot_classifier(classnames, ["a photo of a {}."])
    manual = backbone.model.encode_text(
        backbone.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in classnames])
    )
    assert torch.allclose(single, F.normalize(manual, dim=-1), atol=ATOL)
    with pytest.raises(ValueError):
        backbone.zero_shot_classifier([], templates)


def test_properties(backbone: CLIPBackbone) -> None:
    assert (backbone.n_layers_text, backbone.n_layers_image) == (2, 2)
    assert (backbone.width_text, backbone.width_image, backbone.embed_dim) == (64, 64, 64)
    assert (backbone.context_length, backbone.image_size) == (77, 32)
    assert backbone.dtype == torch.float32 and backbone.is_vit
    assert backbone.logit_scale.item() == pytest.approx(100.0, rel=1e-5) and not backbone.logit_scale.requires_grad
    names = [n for n, _ in backbone.named_parameters()]
    assert "model.visual.transformer.resblocks.0.attn.in_proj_weight" in names
    assert all(p.requires_grad for p in backbone.parameters())  # the wrapper freezes nothing


def test_grad_checkpointing_matches(images: torch.Tensor) -> None:
    backbone = make_tiny_backbone(seed=4)
    reference = backbone.encode_image(images)
    backbone.model.set_grad_checkpointing(True)
    checkpointed = backbone.encode_image(images)
    checkpointed.sum().backward()
    assert torch.allclose(checkpointed, reference, atol=ATOL)
    assert backbone.model.visual.conv1.weight.grad is not None


@torch.no_grad()
def test_resnet_tower(images: torch.Tensor) -> None:
    backbone = make_tiny_backbone(seed=5, arch=TINY_RN)
    assert not backbone.is_vit
    assert torch.allclose(backbone.encode_image(images), backbone.model.encode_image(images), atol=ATOL)
    ids = backbone.tokenize(PROMPTS)
    assert torch.allclose(backbone.encode_text(ids), backbone.model.encode_text(ids), atol=ATOL)
    with pytest.raises(NotImplementedError, match="ViT"):
        backbone.embed_image(images)
    with pytest.raises(NotImplementedError, match="ViT"):
        backbone.encode_image(images, hooks=BlockHooks())
    with pytest.raises(NotImplementedError, match="ViT"):
        _ = backbone.n_layers_image


def test_templates() -> None:
    assert isinstance(IMAGENET_TEMPLATES, tuple) and len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert list(IMAGENET_TEMPLATES) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]  # open_clip's copy of CLIP's
    assert isinstance(IMAGENET_TEMPLATES_SELECT, tuple) and len(IMAGENET_TEMPLATES_SELECT) == 7
    assert set(IMAGENET_TEMPLATES_SELECT) <= set(IMAGENET_TEMPLATES)
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_piecewise_blocks_with_no_branches_equal_the_whole_blocks():
    import open_clip

    from vltune.clip.backbone import BlockHooks, CLIPBackbone

    class Piecewise(BlockHooks):
        branches = True

    torch.manual_seed(0)
    clip = CLIPBackbone(open_clip.create_model("vltune-tiny", pretrained=None), arch="vltune-tiny").eval()
    ids = clip.tokenize(["a photo of a cat.", "a dog"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clip.encode_text(ids, hooks=Piecewise()), clip.encode_text(ids))
        assert torch.equal(clip.encode_image(images, hooks=Piecewise()), clip.encode_image(images))
