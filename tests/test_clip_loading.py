"""load_clip: every weights format gives the same model, and every mismatch fails loudly with keys and shapes."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import vltune  # noqa: F401  (compat shim: must precede open_clip/torchvision)

# isort: split
import open_clip
from clip_fixtures import (
    TINY,
    make_tiny_clip,
    openai_fp16_copy,
    write_open_clip_checkpoint,
    write_openai_jit,
    write_safetensors,
    write_state_dict,
)
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU

from vltune.clip import CLIPBackbone, build_backbone, create_clip, load_clip, resolve_arch
from vltune.clip.loading import DASSL_NAMES, read_state_dict, weight_file_names

WRITERS = {
    "torchscript": (write_openai_jit, "ViT-tiny-openai.pt"),
    "state dict": (write_state_dict, "tiny_state_dict.pt"),
    "open_clip checkpoint": (write_open_clip_checkpoint, "epoch_3.pt"),
    "safetensors": (write_safetensors, "tiny.safetensors"),
}


@pytest.fixture(scope="module")
def original() -> CLIP:
    return make_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def files(original: CLIP, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {fmt: writer(original, root / name) for fmt, (writer, name) in WRITERS.items()}


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = open_clip.get_tokenizer(TINY)(["a photo of a cat.", "a centered satellite photo of a forest."])
    return images, ids


@torch.no_grad()
def features(model: CLIP, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    images, ids = inputs
    return model.encode_image(images), model.encode_text(ids)


def test_openai_archive_is_genuine(files: dict[str, Path]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        archive = torch.jit.load(str(files["torchscript"]), map_location="cpu")
    assert isinstance(archive, torch.jit.ScriptModule)
    state = archive.state_dict()
    assert state["visual.conv1.weight"].dtype == torch.float16 and state["text_projection"].dtype == torch.float16
    assert state["ln_final.weight"].dtype == torch.float32 and int(state["input_resolution"]) == 32


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_loads_the_same_model(
    fmt: str, files: dict[str, Path], original: CLIP, inputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    assert read_state_dict(files[fmt])[1] == fmt
    model = load_clip(TINY, files[fmt])
    assert isinstance(model, CLIP) and not model.training
    assert all(p.dtype == torch.float32 for p in model.state_dict().values())
    image, text = features(model, inputs)
    ref_image, ref_text = features(original, inputs)
    if fmt == "torchscript":  # OpenAI archives hold fp16 weights: exact up to that rounding
        expected = openai_fp16_copy(original).float().state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        assert torch.allclose(image, ref_image, rtol=1e-2, atol=1e-2)
        assert torch.allclose(text, ref_text, rtol=1e-2, atol=1e-2)
    else:
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())
        assert torch.equal(image, ref_image) and torch.equal(text, ref_text)


def test_build_backbone(files: dict[str, Path], original: CLIP, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    backbone = build_backbone(TINY, str(files["safetensors"]))
    assert isinstance(backbone, CLIPBackbone) and backbone.arch == TINY
    images, ids = inputs
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(images), features(original, inputs)[0], atol=1e-5)
        assert torch.equal(backbone.tokenize(["a photo of a cat.", "a centered satellite photo of a forest."]), ids)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_wrong_shape_names_key_and_both_shapes(original: CLIP, tmp_path: Path) -> None:
    state = original.state_dict()
    state["visual.proj"] = torch.zeros(64, 32)
    path = _save(state, tmp_path / "bad_shape.pt")
    with pytest.raises(ValueError) as err:
        load_clip(TINY, path)
    message = str(err.value)
    assert str(path) in message
    assert "key 'visual.proj' has shape (64, 32) but architecture 'vltune-tiny' expects (64, 64)" in message


def test_missing_and_unexpected_keys_are_named(original: CLIP, tmp_path: Path) -> None:
    state = original.state_dict()
    del state["ln_final.weight"]
    with pytest.raises(ValueError, match=r"missing: 'ln_final.weight'"):
        load_clip(TINY, _save(state, tmp_path / "missing.pt"))
    state = {**original.state_dict(), "visual.prompt_tokens": torch.zeros(4, 64)}
    with pytest.raises(ValueError, match=r"unexpected key\(s\): 'visual.prompt_tokens'"):
        load_clip(TINY, _save(state, tmp_path / "unexpected.pt"))


def test_derived_buffers_in_the_file_are_not_errors(original: CLIP, tmp_path: Path) -> None:
    # attn_mask is a non-persistent buffer: absent from state_dict(), rebuilt by the architecture.
    state = {**original.state_dict(), "attn_mask": torch.zeros(77, 77)}
    model = load_clip(TINY, _save(state, tmp_path / "with_mask.pt"))
    assert torch.isinf(model.attn_mask).any()


def test_wrong_architecture_fails(files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="do not fit architecture 'vltune-tiny-rn'"):
        load_clip("vltune-tiny-rn", files["state dict"])


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_clip(TINY, path)


def test_missing_file_lists_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLTUNE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VLTUNE_OFFLINE", "1")  # online, a Dassl name is downloaded (test_weights_download.py)
    with pytest.raises(FileNotFoundError) as err:
        load_clip("ViT-B/16")
    message = str(err.value)
    assert str(tmp_path / "weights" / "ViT-B-16.pt") in message
    assert str(tmp_path / "home" / ".cache" / "clip" / "ViT-B-16.pt") in message
    assert "MODEL.BACKBONE.WEIGHTS" in message
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pt"))):
        load_clip(TINY, tmp_path / "nope.pt")


def test_default_locations_are_searched(original: CLIP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VLTUNE_WEIGHTS_DIR", raising=False)
    cache = tmp_path / "home" / ".cache" / "clip"
    cache.mkdir(parents=True)
    write_state_dict(original, cache / "vltune-tiny.pt")
    assert torch.equal(load_clip(TINY).visual.proj, original.visual.proj)
    monkeypatch.setenv("VLTUNE_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    other = make_tiny_clip(seed=7)
    write_safetensors(other, tmp_path / "weights" / "vltune-tiny.pt")  # format sniffed, not taken from the suffix
    assert torch.equal(load_clip(TINY).visual.proj, other.visual.proj)  # $VLTUNE_WEIGHTS_DIR comes first


def test_unknown_name_suggests_close_one() -> None:
    with pytest.raises(ValueError, match="Did you mean 'vltune-tiny'") as err:
        resolve_arch("vltune-tinny")
    assert "list_backbones" in str(err.value)
    with pytest.raises(ValueError, match="ViT-B/16"):
        load_clip("ViT-B/61")


def test_non_clip_architectures_are_rejected() -> None:
    with pytest.raises(ValueError, match="CustomTextCLIP"):
        create_clip("coca_ViT-B-32")


def test_dassl_names_map_to_openai_architectures() -> None:
    for name, (arch, file) in DASSL_NAMES.items():
        assert resolve_arch(name) == arch
        assert open_clip.get_model_config(arch)["quick_gelu"] is True
        assert weight_file_names(name) == [file]
    assert resolve_arch("ViT-B/16") == "ViT-B-16-quickgelu"
    assert weight_file_names("ViT-L/14@336px") == ["ViT-L-14-336px.pt"]
    assert weight_file_names("ViT-B-16-quickgelu") == ["ViT-B-16-quickgelu.pt", "ViT-B-16.pt"]
    assert resolve_arch("ViT-B-16") == "ViT-B-16"  # plain open_clip names pass through (GELU, not OpenAI's)


def test_vit_b16_is_openai_shaped() -> None:
    model = create_clip("ViT-B/16")  # ~2 s on CPU, random weights
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert sum(p.numel() for p in model.parameters()) == 149_620_737
    assert model.state_dict()["visual.positional_embedding"].shape == (197, 768)
