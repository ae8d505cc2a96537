"""CLIP for vltune: strict weight loading (``loading``), the hooked backbone wrapper (``backbone``), prompt templates.

Importing this package registers vltune's tiny architectures (``model_configs/``) with open_clip.
"""

from __future__ import annotations

import os

import torch

from vltune.clip.backbone import BlockHooks, CLIPBackbone
from vltune.clip.loading import create_clip, list_backbones, load_clip, resolve_arch
from vltune.clip.templates import IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT, PROMPTSRC_TEMPLATES

__all__ = [
    "IMAGENET_TEMPLATES",
    "IMAGENET_TEMPLATES_SELECT",
    "PROMPTSRC_TEMPLATES",
    "BlockHooks",
    "CLIPBackbone",
    "build_backbone",
    "create_clip",
    "list_backbones",
    "load_clip",
    "resolve_arch",
]


def build_backbone(name: str, weights: str | os.PathLike = "", device: str | torch.device = "cpu",
                   pretrained: str = "") -> CLIPBackbone:
    """``CLIPBackbone`` around ``load_clip(name, weights, device, pretrained)`` (fp32, eval mode, nothing frozen)."""
    return CLIPBackbone(load_clip(name, weights, device, pretrained), arch=resolve_arch(name))
