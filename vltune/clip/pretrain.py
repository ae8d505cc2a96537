"""Contrastive pretraining of a small open_clip model on the TRAIN split of a CoOp-layout dataset.

No pretrained CLIP can be downloaded here, and a CLIP with random weights stays at chance whatever a method does.
This builds a real (if tiny) CLIP: images from the split's train list, captions from the class names, an image→text
contrastive loss over the class captions of each step. Test images are never seen. The result is a plain state dict
that loads through the normal local-weights path (``load_clip``).

By default the captions are bare class names, like short alt-text. The benchmark's hand-written templates ("a photo
of the number {}.") then carry words the model never saw, so zero-shot accuracy pays for prompt engineering the way
real CLIP does, and prompt learning has that gap to close: the situation CoOp was designed for.

    python -m vltune.clip.pretrain --split data/digits/split_zhou_Digits.json --out weights/tiny-digits.pt
    (repeat --split to pretrain on several datasets)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vltune.clip import CLIPBackbone, create_clip
from vltune.fileio import atomic_write

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTION_TEMPLATES = ("{}",)


def load_split_images(split_path: str, image_dir: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Train images (N, 3, size, size) in [0, 1], labels (N,), class names by label."""
    with open(split_path) as f:
        train = json.load(f)["train"]
    names: dict[int, str] = {}
    images, labels = [], []
    for rel, label, name in train:
        img = Image.open(os.path.join(image_dir, rel)).convert("RGB").resize((size, size), Image.BICUBIC)
        images.append(np.asarray(img, dtype=np.float32) / 255.0)
        labels.append(int(label))
        names[int(label)] = name
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x, torch.tensor(labels), [names[i] for i in range(len(names))]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _sketch(x: torch.Tensor) -> torch.Tensor:
    """Dark Sobel strokes on white, grey. Input/Output: (B, 3, H, W) in [0, 1]."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel, sobel.t()]).unsqueeze(1)
    grads = F.conv2d(F.pad(x.mean(1, keepdim=True), (1, 1, 1, 1), mode="replicate"), kernels)
    edges = grads.pow(2).sum(1, keepdim=True).sqrt()
    edges = edges / edges.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return (1 - ((edges - 0.15) / 0.6).clamp(0, 1)).expand_as(x)


def _augment(x: torch.Tensor, generator: torch.Generator, photometric: float, max_shift: int = 3) -> torch.Tensor:
    """Random translation by up to ``max_shift`` px; with ``photometric`` p > 0, each image independently turns
    grey (p), gets its brightness inverted (p / 2), is drawn as a sketch (p) or gets Gaussian noise (p).
    Input/Output: (B, 3, H, W) in [0, 1].
    """
    h, w = x.shape[-2:]
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    x = padded[:, :, dy:dy + h, dx:dx + w]
    if photometric > 0:
        n = len(x)
        u = torch.rand(n, 4, generator=generator)
        grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(x)
        x = torch.where((u[:, 0] < photometric).view(n, 1, 1, 1), grey, x)
        x = torch.where((u[:, 1] < photometric / 2).view(n, 1, 1, 1), 1 - x, x)
        x = torch.where((u[:, 3] < photometric).view(n, 1, 1, 1), _sketch(x), x)
        noise = 0.15 * torch.randn(x.shape, generator=generator)
        x = torch.where((u[:, 2] < photometric).view(n, 1, 1, 1), (x + noise).clamp(0, 1), x)
    return x


def pretrain(sources: Sequence[tuple[str, str]], out_path: str, arch: str = "vltune-tiny", steps: int = 400,
             batch_size: int = 128, lr: float = 1e-3, seed: int = 0, templates: tuple[str, ...] = CAPTION_TEMPLATES,
             photometric: float = 0.0) -> dict[str, float]:
    """Train ``arch`` from scratch on the train splits of ``sources`` and save its state dict to ``out_path``.

    Args:
        sources: ``(split JSON, image folder)`` per dataset. Step ``i`` draws its batch from dataset ``i mod n`` and
            contrasts it with that dataset's class captions only, so datasets whose classes overlap in meaning
            ("circle" and "red circle") never count each other's images as negatives.
        photometric: probability of the per-image photometric augmentations (see ``_augment``); web-scale CLIP data
            holds grey, inverted, sketched and noisy renditions, a few thousand rendered images do not.

    Returns:
        Wall-clock seconds and the final loss.
    """
    import open_clip

    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    model = create_clip(arch)
    backbone = CLIPBackbone(model, arch)  # text cut to the longest caption: same features, ~2x faster steps
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    data = []
    for split_path, image_dir in sources:
        x, y, names = load_split_images(split_path, image_dir, size)
        data.append((x, y, [n.replace("_", " ") for n in names]))
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n != "logit_scale"], lr=lr,
                                  weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start, loss = time.time(), torch.tensor(0.0)
    for step in range(steps):
        x, y, names = data[step % len(data)]
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        captions = [rng.choice(templates).format(n) for n in names]
        image = F.normalize(model.encode_image(_normalize(_augment(x[idx], generator, photometric))), dim=-1)
        text = F.normalize(backbone.encode_text(tokenizer(captions)), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * image @ text.t(), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    atomic_write(out_path, lambda f: torch.save(model.state_dict(), f))
    return {"seconds": time.time() - start, "final_loss": float(loss.detach())}


MINIBENCH_STEPS = 2000
MINIBENCH_PHOTOMETRIC = 0.3
MINIBENCH_CAPTIONS = ("{}", "a photo of a {}.")


PRETRAIN_DATASETS = ("MiniUnion",)  # the mini CLIP's "web data": never the downstream datasets' own splits


def build_minibench_clip(folders: dict[str, str], out_path: str, arch: str = "vltune-tiny",
                         steps: int = MINIBENCH_STEPS, seed: int = 0) -> dict[str, float]:
    """The mini CLIP: pretrained on the train split of MiniUnion only (``folders``: ``write_minibench``'s result).

    MiniUnion holds fresh draws of every procedural class and the digits, in their usual renditions. The downstream
    datasets are other draws, and MiniShapes and MiniObjects another rendition (see ``vltune.data.minibench``), so
    the mini CLIP meets them as real CLIP meets a downstream benchmark: knowing the concepts, not the images.
    """
    missing = [name for name in PRETRAIN_DATASETS if name not in folders]
    if missing:
        raise FileNotFoundError(f"the mini CLIP pretrains on {', '.join(PRETRAIN_DATASETS)}; not among the "
                                f"folders given ({', '.join(sorted(folders))}): run write_minibench first")
    sources = []
    for folder in (folders[name] for name in PRETRAIN_DATASETS):
        for split in sorted(glob.glob(os.path.join(folder, "split_zhou_*.json"))):
            sources.append((split, os.path.join(folder, "images")))
    if not sources:
        raise FileNotFoundError(f"no split_zhou_*.json in {[folders[n] for n in PRETRAIN_DATASETS]}")
    return pretrain(sources, out_path, arch=arch, steps=steps, seed=seed, photometric=MINIBENCH_PHOTOMETRIC,
                    templates=MINIBENCH_CAPTIONS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", required=True, action="append", help="split_zhou_*.json (repeat for several datasets;"
                   " images are read from <split folder>/images)")
    p.add_argument("--out", required=True, help="output state dict path")
    p.add_argument("--arch", default="vltune-tiny")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    sources = [(split, os.path.join(os.path.dirname(split), "images")) for split in a.split]
    print(pretrain(sources, a.out, arch=a.arch, steps=a.steps, seed=a.seed))


if __name__ == "__main__":
    main()
