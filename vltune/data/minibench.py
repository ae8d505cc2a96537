"""MiniBench: deterministic, offline miniature datasets for CLIP adaptation's four protocols, in CoOp layout.

Without real CLIP weights or datasets, a tiny CLIP (ViT, 32×32 input) is pretrained on the TRAIN split of MiniUnion
(below), and the methods are then benchmarked on these datasets exactly as on the real suite. MiniUnion holds every
class in its usual rendition; the downstream datasets are fresh draws, and two of them another rendition (``GROUNDS``),
so the mini CLIP knows their concepts but not their images, as real CLIP knows EuroSAT's classes but not satellite
views: its zero-shot accuracy there is weak and few-shot learning has much to gain, growing with the shots.

* **MiniShapes** (``mini_shapes``, 10 classes): grey shapes (circle, square, triangle, star, cross, hexagon,
  diamond, ring, arrow, crescent), dark on a light noisy ground (MiniUnion: light on dark), random size (40-80 % of
  the image), position and rotation. A small generic object-recognition dataset, the role of Caltech101.
* **MiniTextures** (``mini_textures``, 10 classes): full-frame patterns (stripes in three orientations,
  checkerboard, polka dots, grid, zigzag, waves, concentric rings, speckle) in a random colour pair with random
  scale and phase. The role of DTD (DescribableTextures), with its template ``"{} texture."``.
* **MiniObjects** (``mini_objects``, 12 classes = 4 colours × 3 shapes, ``"red circle"`` ... ``"yellow triangle"``):
  coloured shapes on a dark noisy ground (MiniUnion: light); the class is a colour-shape composition, a fine-grained
  dataset in the spirit of OxfordPets or StanfordCars. The mini CLIP reads colours on a dark ground wrongly: its
  zero-shot accuracy here is near zero, and every method has to learn the new rendition from the shots.
* **Digits** (``digits``, 10 classes, ``vltune.data.synthetic``): scikit-learn's real handwritten digits.
* **MiniUnion** (``mini_union``, 42 classes): the three procedural families from fresh draws (another seed, so no
  image equals one of the component datasets) plus the ten digit classes, whose images are copies of the first
  50/10/30 images per class of the digits train/val/test splits. Its train split is the mini CLIP's pretraining
  data (its "web data"), and it plays ImageNet: the broad source dataset of cross-dataset transfer (evaluated on MiniShapes, MiniTextures, MiniObjects and Digits) and of domain
  generalisation. Label order (``UNION_CLASSES``): the first half of each family, then the second half, so that
  base-to-new's base classes (the first 21) hold half of every family:
  5 shapes, 5 textures, 6 objects, 5 digits, then the other 5 shapes, 5 textures, 6 objects and 5 digits.
* Test-only variants of MiniUnion, same 42 classes and labels, 30 test images per class; procedural classes are
  fresh draws, digit classes the last 30 images per class of the digits TEST split, then shifted:
  **MiniUnionV2** (``mini_union_v2``) no shift, a new sample of the same distribution (plays ImageNetV2);
  **MiniUnionSketch** (``mini_union_sketch``) edge maps, dark strokes on white (plays ImageNet-Sketch);
  **MiniUnionNoise** (``mini_union_noise``) a random occluding patch and heavy Gaussian noise, the hardest
  (plays ImageNet-A); **MiniUnionInverted** (``mini_union_inverted``) brightness inverted with the hue kept, a
  different rendition of the same classes (plays ImageNet-R).

Per class: 50 train, 10 val and 30 test 32×32 RGB PNGs at ``<root>/<dataset_dir>/images/<class_folder>/<nnnn>.png``
(class folder = class name with ``_`` for spaces) and ``split_zhou_<Name>.json``. Output is byte-identical for the
same seed: each class draws from ``numpy.random.default_rng([seed, dataset stream, label])``. Generate with
``python -m vltune.data.minibench --root DATA [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Callable

import numpy as np
from PIL import Image

from vltune.data import mini_render
from vltune.data.synthetic import DIGIT_NAMES, write_digits_dataset
from vltune.fileio import atomic_write

logger = logging.getLogger(__name__)

N_TRAIN, N_VAL, N_TEST = 50, 10, 30  # images per class and split
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring", "arrow", "crescent")
TEXTURES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots", "grid",
            "zigzag", "waves", "concentric rings", "speckle")  # fmt: skip
OBJECT_COLOURS = ("red", "green", "blue", "yellow")
OBJECT_SHAPES = ("circle", "square", "triangle")
OBJECTS = tuple(f"{c} {s}" for c in OBJECT_COLOURS for s in OBJECT_SHAPES)  # red circle, red square, ...
DIGITS = DIGIT_NAMES
# MiniUnion's label order: the first half of every family, then the second halves.
UNION_CLASSES = (
    SHAPES[:5] + TEXTURES[:5] + OBJECTS[:6] + DIGITS[:5]  # labels 0-20: the base classes of base-to-new
    + SHAPES[5:] + TEXTURES[5:] + OBJECTS[6:] + DIGITS[5:]  # labels 21-41: the new classes
)  # fmt: skip

# Registry name → (dataset_dir, classes, seed stream, shift). shift None: train/val/test; else test-only variant.
DATASETS: dict[str, tuple[str, tuple[str, ...], int, str | None]] = {
    "MiniShapes": ("mini_shapes", SHAPES, 1, None),
    "MiniTextures": ("mini_textures", TEXTURES, 2, None),
    "MiniObjects": ("mini_objects", OBJECTS, 3, None),
    "MiniUnion": ("mini_union", UNION_CLASSES, 4, None),
    "MiniUnionV2": ("mini_union_v2", UNION_CLASSES, 5, "none"),
    "MiniUnionSketch": ("mini_union_sketch", UNION_CLASSES, 6, "sketch"),
    "MiniUnionNoise": ("mini_union_noise", UNION_CLASSES, 7, "noise"),
    "MiniUnionInverted": ("mini_union_inverted", UNION_CLASSES, 8, "inverted"),
}
# Registry name → the ground its procedural images are drawn on, where it differs from MiniUnion's (grey shapes on
# a dark ground, coloured shapes on a light one): renditions the mini CLIP never sees in pretraining.
GROUNDS: dict[str, str] = {"MiniShapes": "light", "MiniObjects": "dark"}
SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "none": lambda image, rng: image,
    "sketch": lambda image, rng: mini_render.sketch(image),
    "noise": mini_render.noisy_occluded,
    "inverted": lambda image, rng: mini_render.luminance_inverted(image),
}


def render(classname: str, rng: np.random.Generator, ground: str | None = None) -> np.ndarray:
    """One fresh ``(32, 32, 3)`` uint8 image of a procedural class (a shape, texture or object name); ``ground``
    overrides a shape's default ground (see ``GROUNDS``)."""
    if classname in SHAPES:
        return mini_render.gray_shape(classname, rng, **({"ground": ground} if ground else {}))
    if classname in TEXTURES:
        return mini_render.texture(classname, rng)
    if classname in OBJECTS:
        colour, shape = classname.split(" ")
        return mini_render.coloured_shape(colour, shape, rng, **({"ground": ground} if ground else {}))
    raise ValueError(f"{classname!r} is not a procedural MiniBench class")


def save_png(array: np.ndarray, path: str) -> None:
    """Fixed PNG parameters, so equal pixels give equal bytes. Images are written in place (no fsync: thousands of
    files); the split JSON, written atomically and last, is what marks a dataset folder complete."""
    Image.fromarray(array, "RGB").save(path, format="PNG", compress_level=1)


def digit_sources(root: str) -> dict[tuple[str, str], list[str]]:
    """``(split, digit name) → absolute image paths`` of the digits dataset under ``root``, in split-file order."""
    folder = write_digits_dataset(root)
    with open(os.path.join(folder, "split_zhou_Digits.json")) as f:
        split = json.load(f)
    out: dict[tuple[str, str], list[str]] = {}
    for key in ("train", "val", "test"):
        for rel, _, name in split[key]:
            out.setdefault((key, name), []).append(os.path.join(folder, "images", rel))
    return out


def write_class(
    image_dir: str,
    label: int,
    classname: str,
    rng: np.random.Generator,
    shift: str | None,
    digits: dict[tuple[str, str], list[str]],
    ground: str | None = None,
) -> dict[str, list]:
    """Write one class's images into ``image_dir/<class folder>/``; returns its split entries per split."""
    class_dir = classname.replace(" ", "_")
    os.makedirs(os.path.join(image_dir, class_dir), exist_ok=True)
    counts = {"test": N_TEST} if shift else {"train": N_TRAIN, "val": N_VAL, "test": N_TEST}
    entries: dict[str, list] = {key: [] for key in counts}
    n = 0  # image number within the class: train, then val, then test
    for key, count in counts.items():
        # Digits: MiniUnion copies the first images of each split; the variants take the last test images.
        sources = digits.get((key, classname), [])
        sources = sources[-count:] if shift else sources[:count]
        for i in range(count):
            rel, n = f"{class_dir}/{n:04d}.png", n + 1
            entries[key].append([rel, label, classname])
            path = os.path.join(image_dir, rel)
            if classname not in DIGITS:
                image = render(classname, rng, ground)
            elif shift in (None, "none"):  # a byte-exact copy of the digits image
                shutil.copyfile(sources[i], path)
                continue
            else:
                with Image.open(sources[i]) as source:
                    image = np.asarray(source.convert("RGB"))
            save_png(SHIFTS[shift](image, rng) if shift else image, path)
    return entries


def write_dataset(root: str, name: str, seed: int = 0) -> str:
    """Write the MiniBench dataset ``name`` under ``root`` (skipped when its split file exists); returns its folder."""
    if name not in DATASETS:
        raise ValueError(f"unknown MiniBench dataset {name!r}; valid: {', '.join(DATASETS)}")
    dataset_dir, classes, stream, shift = DATASETS[name]
    folder = os.path.join(root, dataset_dir)
    split_path = os.path.join(folder, f"split_zhou_{name}.json")
    if os.path.isfile(split_path):
        return folder
    digits = digit_sources(root) if set(classes) & set(DIGITS) else {}
    image_dir = os.path.join(folder, "images")
    per_class = [
        write_class(image_dir, label, c, np.random.default_rng([seed, stream, label]), shift, digits,
                    GROUNDS.get(name))
        for label, c in enumerate(classes)
    ]
    split = {key: [e for entries in per_class for e in entries.get(key, [])] for key in ("train", "val", "test")}
    atomic_write(split_path, json.dumps(split, indent=4, separators=(",", ": ")).encode())
    logger.info(f"Wrote {name} ({len(classes)} classes) to {folder}")
    return folder


def write_minibench(root: str, seed: int = 0) -> dict[str, str]:
    """Write Digits and every MiniBench dataset under ``root`` (each skipped when its split file exists).

    Returns:
        ``{registry name: dataset folder}``, Digits first.
    """
    folders = {"Digits": write_digits_dataset(root)}
    for name in DATASETS:
        folders[name] = write_dataset(root, name, seed)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the MiniBench datasets (and Digits) in CoOp layout.")
    parser.add_argument("--root", required=True, help="data root (DATASET.ROOT); dataset folders go under it")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (same seed = byte-identical files)")
    args = parser.parse_args(argv)
    for name, folder in write_minibench(args.root, args.seed).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
