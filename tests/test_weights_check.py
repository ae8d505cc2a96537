"""``python -m vltune.clip check``: format, inferred architecture, parameter count and the MODEL.BACKBONE.NAME fit,
for every supported file format, on tiny CLIPs written here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from clip_fixtures import (
    TINY_RN,
    make_tiny_clip,
    write_open_clip_checkpoint,
    write_openai_jit,
    write_safetensors,
    write_state_dict,
)
from conftest import REPO

from vltune.clip import create_clip
from vltune.clip.check import infer_sizes, inspect_weights, main, matching_architectures

WRITERS = {"torchscript": write_openai_jit, "state dict": write_state_dict,
           "open_clip checkpoint": write_open_clip_checkpoint, "safetensors": write_safetensors}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_is_recognised_with_its_architecture_and_size(fmt, tmp_path):
    model = make_tiny_clip()
    path = WRITERS[fmt](model, tmp_path / "weights.bin")
    info = inspect_weights(str(path))
    assert info.format == fmt
    assert info.n_params == sum(p.numel() for p in model.parameters())
    assert "vltune-tiny" in info.candidates
    assert info.sizes == {"context_length": 77, "text_width": 64, "vocab_size": 49408, "text_layers": 2,
                          "embed_dim": 64, "vision": "vit", "vision_width": 64, "vision_layers": 2, "patch_size": 8,
                          "image_size": 32}


def test_resnet_sizes_and_the_vit_b16_names():
    assert "vltune-tiny-rn" in matching_architectures(infer_sizes(make_tiny_clip(arch=TINY_RN).state_dict()))
    torch.manual_seed(0)
    vit_b16 = create_clip("ViT-B/16").state_dict()
    sizes = infer_sizes(vit_b16)
    assert (sizes["vision_width"], sizes["vision_layers"], sizes["patch_size"], sizes["image_size"]) == (
        768, 12, 16, 224)
    candidates = matching_architectures(sizes)
    assert "ViT-B-16-quickgelu" in candidates and "ViT-B-16" in candidates and "ViT-B-32" not in candidates


def test_backbone_fit_and_mismatch(tmp_path, capsys):
    path = str(write_state_dict(make_tiny_clip(), tmp_path / "tiny.pt"))
    assert main([path, "--backbone", "vltune-tiny"]) == 0
    out = capsys.readouterr().out
    assert "format:       state dict" in out and "architecture: vltune-tiny" in out and "fits" in out
    assert main([path, "--backbone", "vltune-tiny-rn"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "key(s) missing" in out


@pytest.mark.slow  # two `python -m vltune.clip` subprocesses
def test_unreadable_file_and_module_entry_point(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not weights")
    run = subprocess.run([sys.executable, "-m", "vltune.clip", "check", str(bad)], capture_output=True, text=True,
                         cwd=REPO)
    assert run.returncode == 1 and "UNREADABLE" in run.stdout and str(bad) in run.stdout
    run = subprocess.run([sys.executable, "-m", "vltune.clip", "inspect"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "usage" in run.stderr
