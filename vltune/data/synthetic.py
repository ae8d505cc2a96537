"""Small real datasets generated offline in CoOp layout, for tests and the default job.

``write_digits_dataset`` turns scikit-learn's handwritten digits (1,797 8×8 images, 10 classes) into
``<root>/digits/images/<class>/<n>.png`` plus ``split_zhou_Digits.json`` (per class 50 % train, 20 % val, 30 % test),
exactly the files a CoOp dataset folder holds. Output is byte-identical for the same seed.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
from PIL import Image

from vltune.fileio import atomic_write

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digits_dataset(root: str, image_size: int = 32, seed: int = 0) -> str:
    """Write the digits dataset under ``root/digits`` (skipped when its split file exists); returns that folder."""
    from sklearn.datasets import load_digits

    folder = os.path.join(root, "digits")
    split_path = os.path.join(folder, "split_zhou_Digits.json")
    if os.path.isfile(split_path):
        return folder
    digits = load_digits()
    per_class: dict[int, list[str]] = {c: [] for c in range(10)}
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        name = DIGIT_NAMES[label]
        rel = f"{name}/{i:04d}.png"
        path = os.path.join(folder, "images", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        array = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(array, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB").save(path)
        per_class[int(label)].append(rel)
    rng = random.Random(seed)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, items in per_class.items():
        rng.shuffle(items)
        n_train, n_val = round(len(items) * 0.5), round(len(items) * 0.2)
        for key, part in (
            ("train", items[:n_train]),
            ("val", items[n_train : n_train + n_val]),
            ("test", items[n_train + n_val :]),
        ):
            split[key] += [[rel, label, DIGIT_NAMES[label]] for rel in part]
    atomic_write(split_path, json.dumps(split, indent=4, separators=(",", ": ")).encode())
    return folder
