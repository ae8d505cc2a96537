"""Test helpers: a seeded random tiny CLIP and writers for every weights format ``load_clip`` reads.

No pretrained weights exist offline, so the loading tests write their own files: an OpenAI-style TorchScript archive
(fp16 conv/linear/projection weights, the ``input_resolution``/``context_length``/``vocab_size`` entries, OpenAI's key
names, which open_clip's ``CLIP`` shares), a plain state dict, an open_clip training checkpoint with ``module.``
prefixes, and a safetensors file.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import torch
from torch import nn

import vltune  # noqa: F401  (compat shim: must precede open_clip/torchvision)

# isort: split
from open_clip.model import CLIP, convert_weights_to_lp

from vltune.clip import CLIPBackbone, create_clip

TINY = "vltune-tiny"
TINY_RN = "vltune-tiny-rn"


def make_tiny_clip(seed: int = 0, arch: str = TINY) -> CLIP:
    """A random fp32 CLIP in eval mode. LayerNorm parameters and biases (ones/zeros at init) get noise so that a
    loader that skips them is caught; τ = exp(logit_scale) is 100 as in OpenAI's weights."""
    torch.manual_seed(seed)
    model = create_clip(arch)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or any(part.startswith("ln_") for part in name.split(".")):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        model.logit_scale.fill_(math.log(100.0))
    return model.eval()


def make_deep_backbone(text_layers: int, image_layers: int, seed: int = 0) -> CLIPBackbone:
    """A random vltune-tiny-shaped CLIP (width 64, 32 px) with chosen depths: blocks before, at and after a method's
    prompted or injected layers all exist."""
    torch.manual_seed(seed)
    model = CLIP(64, dict(image_size=32, layers=image_layers, width=64, patch_size=8, head_width=64),
                 dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=text_layers), quick_gelu=True)
    return CLIPBackbone(model.eval(), arch=TINY)


def make_tiny_backbone(seed: int = 0, arch: str = TINY) -> CLIPBackbone:
    """``CLIPBackbone`` around ``make_tiny_clip``."""
    return CLIPBackbone(make_tiny_clip(seed, arch), arch=arch)


class _OpenAIArchive(nn.Module):
    """Holds a CLIP's modules and parameters under their own names (OpenAI's layout), plus OpenAI's metadata
    entries, so that the scripted module's state dict looks like the one of OpenAI's JIT archives."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.register_buffer("input_resolution", torch.tensor(model.visual.image_size[0]))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale.exp()


def openai_fp16_copy(model: CLIP) -> CLIP:
    """A copy with OpenAI's mixed precision: conv/linear/attention weights and projections fp16, the rest fp32."""
    model16 = copy.deepcopy(model)
    convert_weights_to_lp(model16, dtype=torch.float16)
    return model16


def write_openai_jit(model: CLIP, path: str | Path) -> Path:
    """Write ``model`` as a genuine TorchScript zip in OpenAI's layout (fp16 weights, metadata entries)."""
    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's archives are TorchScript all the same
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.script(_OpenAIArchive(openai_fp16_copy(model))).save(str(path))
    return Path(path)


def write_state_dict(model: CLIP, path: str | Path) -> Path:
    """Write ``model.state_dict()`` with ``torch.save``."""
    torch.save(model.state_dict(), path)
    return Path(path)


def write_open_clip_checkpoint(model: CLIP, path: str | Path) -> Path:
    """Write an open_clip training checkpoint as saved from DistributedDataParallel (``module.`` prefixes)."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-3, "params": list(range(len(state)))}]}
    torch.save({"epoch": 3, "name": "tiny", "state_dict": state, "optimizer": optimizer}, path)
    return Path(path)


def write_safetensors(model: CLIP, path: str | Path) -> Path:
    """Write ``model.state_dict()`` as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)
