"""What is in a CLIP weights file? ``python -m vltune.clip check WEIGHTS [--backbone NAME]``.

Reports the file format (OpenAI TorchScript archive, torch.save state dict, open_clip checkpoint, safetensors), the
architecture inferred from the tensor shapes (tower widths, depths, patch size, resolution, context length,
embedding size) with the backbone names that have exactly those sizes, and the parameter count. With ``--backbone``
(a ``MODEL.BACKBONE.NAME``) it also checks, strictly, that the file loads into that architecture. Exit status: 0
when the file is readable (and fits ``--backbone``), 1 otherwise. Nothing is written or downloaded.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any

import open_clip
import torch

from vltune.clip.loading import DASSL_NAMES, check_state_dict, create_clip, read_state_dict, resolve_arch


@dataclass
class WeightsInfo:
    """A weights file's format, inferred sizes, parameter count and the architectures those sizes fit."""

    path: str
    format: str
    sizes: dict[str, Any]
    n_params: int
    candidates: list[str]

    @property
    def names(self) -> list[str]:
        """The candidates as backbone names: Dassl names (``ViT-B/16``) first, then open_clip architectures."""
        dassl = [d for d, (arch, _) in DASSL_NAMES.items() if arch in self.candidates]
        return dassl + [c for c in self.candidates if c not in {DASSL_NAMES[d][0] for d in dassl}]


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state for m in [pattern.match(k)] if m})


def infer_sizes(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture sizes that the tensor shapes of a CLIP state dict determine (open_clip key names)."""
    sizes: dict[str, Any] = {}
    if "positional_embedding" in state:
        sizes["context_length"], sizes["text_width"] = state["positional_embedding"].shape
    if "token_embedding.weight" in state:
        sizes["vocab_size"] = state["token_embedding.weight"].shape[0]
    sizes["text_layers"] = _blocks(state, "transformer.resblocks.")
    if "text_projection" in state:
        sizes["embed_dim"] = state["text_projection"].shape[-1]
    if "visual.conv1.weight" in state and "visual.positional_embedding" in state:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        sizes.update(vision="vit", vision_width=width, vision_layers=_blocks(state, "visual.transformer.resblocks."),
                     patch_size=patch, image_size=grid * patch)
    elif "visual.layer1.0.conv1.weight" in state:
        layers = [_blocks(state, f"visual.layer{i}.") for i in range(1, 5)]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        sizes.update(vision="resnet", vision_width=state["visual.layer1.0.conv1.weight"].shape[1],
                     vision_layers=layers, image_size=grid * 32)
    return sizes


def _config_sizes(cfg: dict[str, Any]) -> dict[str, Any]:
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    layers = v.get("layers")
    out = {"context_length": t.get("context_length", 77), "text_width": t.get("width", 512),
           "vocab_size": t.get("vocab_size", 49408), "text_layers": t.get("layers", 12),
           "embed_dim": cfg.get("embed_dim"), "vision_width": v.get("width", 768),
           "image_size": v.get("image_size", 224)}
    if isinstance(layers, (list, tuple)):
        out.update(vision="resnet", vision_layers=list(layers))
    else:
        out.update(vision="vit", vision_layers=layers, patch_size=v.get("patch_size", 16))
    return out


def matching_architectures(sizes: dict[str, Any]) -> list[str]:
    """open_clip architectures (CLIP text tower, no custom tower) whose config has exactly ``sizes``."""
    out = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        if not cfg.get("vision_cfg") or cfg.get("text_cfg", {}).get("hf_model_name") or "timm_model_name" in \
                cfg["vision_cfg"]:
            continue
        expected = _config_sizes(cfg)
        if all(expected.get(k) == v for k, v in sizes.items()):
            out.append(name)
    return out


def inspect_weights(path: str) -> WeightsInfo:
    """Read ``path`` (any supported format) and infer what it holds; raises ValueError when it is unreadable."""
    state, fmt = read_state_dict(path)
    sizes = infer_sizes(state)
    n_params = sum(v.numel() for k, v in state.items() if k != "attn_mask")
    return WeightsInfo(str(path), fmt, sizes, n_params, matching_architectures(sizes))


def fits(path: str, backbone: str) -> str:
    """'' when ``path`` loads strictly into ``backbone``'s architecture, else the reason."""
    arch = resolve_arch(backbone)
    state, _ = read_state_dict(path)
    model = create_clip(arch)
    state = {k: v for k, v in state.items() if k != "attn_mask"}
    try:
        check_state_dict(state, model, arch, path)
    except ValueError as err:
        return str(err)
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vltune.clip check", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="a local CLIP weights file")
    p.add_argument("--backbone", default="", help="MODEL.BACKBONE.NAME to check the file against (e.g. ViT-B/16)")
    args = p.parse_args(argv)
    try:
        info = inspect_weights(args.weights)
    except (ValueError, FileNotFoundError, IsADirectoryError) as err:
        print(f"UNREADABLE: {err}")
        return 1
    print(f"file:         {info.path}")
    print(f"format:       {info.format}")
    print(f"parameters:   {info.n_params:,}")
    print("sizes:        " + ", ".join(f"{k} {v}" for k, v in info.sizes.items()))
    print(f"architecture: {', '.join(info.names) if info.names else 'no known architecture has these sizes'}")
    if not args.backbone:
        return 0
    try:
        reason = fits(args.weights, args.backbone)
    except ValueError as err:  # an unknown backbone name
        reason = str(err)
    if reason:
        print(f"MODEL.BACKBONE.NAME {args.backbone}: DOES NOT FIT\n{reason}")
        return 1
    print(f"MODEL.BACKBONE.NAME {args.backbone}: fits (strict key and shape check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
