"""Image transforms by Dassl name (``INPUT.TRANSFORMS``), applied in Dassl's fixed order.

CLIP configs use ``random_resized_crop, random_flip, normalize`` for training; the test transform is always
Resize(shorter side) → CenterCrop → ToTensor → Normalize. Dassl's own RandAugment/AutoAugment implementations are
replaced by torchvision's (RandAugment with 31 magnitude bins, so ``RANDAUGMENT_M`` keeps Dassl's 0-30 scale).
"""

from __future__ import annotations

import random

import torch  # vltune/__init__ (the compat shim) has run before any vltune.data module
from torchvision import transforms as T
from yacs.config import CfgNode

INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}
AVAILABLE = (
    "random_flip",
    "random_resized_crop",
    "normalize",
    "instance_norm",
    "random_crop",
    "random_translation",
    "center_crop",
    "cutout",
    "imagenet_policy",
    "cifar10_policy",
    "svhn_policy",
    "randaugment",
    "gaussian_noise",
    "colorjitter",
    "randomgrayscale",
    "gaussian_blur",
)
#: transforms that give the same output every time (a train transform of only these allows caching features)
DETERMINISTIC = ("normalize", "instance_norm", "center_crop")
UNSUPPORTED = ("randaugment_fixmatch", "randaugment2")  # Dassl-specific op lists with no torchvision equivalent


class RandomTranslation:
    """With p=0.5 enlarge by 1/8 and crop back to (H, W) at a random offset; else resize to (H, W) (Dassl)."""

    def __init__(self, height: int, width: int, p: float = 0.5, interpolation=T.InterpolationMode.BILINEAR):
        self.size, self.p, self.interpolation = (height, width), p, interpolation

    def __call__(self, img):
        if random.uniform(0, 1) > self.p:
            return T.functional.resize(img, list(self.size), self.interpolation)
        big = [round(s * 1.125) for s in self.size]
        img = T.functional.resize(img, big, self.interpolation)
        top, left = random.randint(0, big[0] - self.size[0]), random.randint(0, big[1] - self.size[1])
        return T.functional.crop(img, top, left, *self.size)


class Cutout:
    """Zero ``n_holes`` squares of side ``length`` in a (3, H, W) tensor."""

    def __init__(self, n_holes: int = 1, length: int = 16):
        self.n_holes, self.length = n_holes, length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        mask = torch.ones(h, w)
        for _ in range(self.n_holes):
            y, x = int(torch.randint(h, ())), int(torch.randint(w, ()))
            half = self.length // 2
            mask[max(0, y - half) : y + half, max(0, x - half) : x + half] = 0
        return img * mask


class GaussianNoise:
    def __init__(self, mean: float = 0.0, std: float = 0.15):
        self.mean, self.std = mean, std

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img + torch.randn_like(img) * self.std + self.mean


def instance_norm(img: torch.Tensor) -> torch.Tensor:
    """Normalise each channel of a (3, H, W) tensor to zero mean, unit std."""
    flat = img.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-8)).view_as(img)


def build_transform(cfg: CfgNode, is_train: bool) -> T.Compose:
    """The train (augmented) or test transform for ``cfg.INPUT``; unknown names raise ``ValueError``."""
    choices = list(cfg.INPUT.TRANSFORMS)
    for name in choices:
        if name in UNSUPPORTED:
            raise ValueError(f"transform {name!r} is Dassl-only and not implemented in vltune; use 'randaugment'")
        if name not in AVAILABLE:
            raise ValueError(f"unknown transform {name!r} in INPUT.TRANSFORMS; valid: {', '.join(AVAILABLE)}")
    if cfg.INPUT.INTERPOLATION not in INTERPOLATION:
        raise ValueError(
            f"INPUT.INTERPOLATION must be one of {', '.join(INTERPOLATION)}; got {cfg.INPUT.INTERPOLATION!r}"
        )
    interp, size = INTERPOLATION[cfg.INPUT.INTERPOLATION], list(cfg.INPUT.SIZE)
    normalize = T.Normalize(mean=cfg.INPUT.PIXEL_MEAN, std=cfg.INPUT.PIXEL_STD)
    if not is_train:
        tfms = [T.Resize(max(size), interpolation=interp), T.CenterCrop(size), T.ToTensor()]
        tfms += [normalize] if "normalize" in choices else []
        return T.Compose(tfms + ([instance_norm] if "instance_norm" in choices else []))

    inp = cfg.INPUT
    steps = [  # (name, transform) in Dassl's fixed order
        ("random_translation", lambda: RandomTranslation(size[0], size[1], interpolation=interp)),
        ("random_crop", lambda: T.RandomCrop(size, padding=inp.CROP_PADDING)),
        (
            "random_resized_crop",
            lambda: T.RandomResizedCrop(size, scale=tuple(inp.RRCROP_SCALE), interpolation=interp),
        ),
        ("center_crop", lambda: T.CenterCrop(size)),
        ("random_flip", lambda: T.RandomHorizontalFlip()),
        ("imagenet_policy", lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)),
        ("cifar10_policy", lambda: T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)),
        ("svhn_policy", lambda: T.AutoAugment(T.AutoAugmentPolicy.SVHN)),
        ("randaugment", lambda: T.RandAugment(inp.RANDAUGMENT_N, inp.RANDAUGMENT_M, num_magnitude_bins=31)),
        (
            "colorjitter",
            lambda: T.ColorJitter(inp.COLORJITTER_B, inp.COLORJITTER_C, inp.COLORJITTER_S, inp.COLORJITTER_H),
        ),
        ("randomgrayscale", lambda: T.RandomGrayscale(p=inp.RGS_P)),
        ("gaussian_blur", lambda: T.RandomApply([T.GaussianBlur(inp.GB_K)], p=inp.GB_P)),
        ("to_tensor", T.ToTensor),
        ("cutout", lambda: Cutout(inp.CUTOUT_N, inp.CUTOUT_LEN)),
        ("normalize", lambda: normalize),
        ("gaussian_noise", lambda: GaussianNoise(inp.GN_MEAN, inp.GN_STD)),
        ("instance_norm", lambda: instance_norm),
    ]
    # Without a crop the image is resized to exactly SIZE first (Dassl), so every output has the target size.
    tfms = [] if {"random_crop", "random_resized_crop"} & set(choices) else [T.Resize(size, interpolation=interp)]
    tfms += [make() for name, make in steps if name in choices or name == "to_tensor"]
    return T.Compose(tfms)
