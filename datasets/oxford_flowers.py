"""Oxford Flowers 102. Nilsback & Zisserman, "Automated Flower Classification over a Large Number of Classes",
ICVGIP 2008. https://www.robots.ox.ac.uk/~vgg/data/flowers/102/

CoOp split ``split_zhou_OxfordFlowers.json`` (upstream: CoOp ``datasets/oxford_flowers.py``).
"""

from __future__ import annotations

import json
import os

import numpy as np

from vltune.data import CoOpDataset, Datum, splits
from vltune.registry import DATASETS


@DATASETS.register()
class OxfordFlowers(CoOpDataset):
    """Rebuild: ``imagelabels.mat`` (1-based, scipy) + ``cat_to_name.json``; per class 50/20/30 in label order of
    first appearance."""

    dataset_dir = "oxford_flowers"
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    template = "a photo of a {}, a type of flower."
    layout = "oxford_flowers/  jpg/, imagelabels.mat, cat_to_name.json, split_zhou_OxfordFlowers.json"

    def build_split(self) -> splits.Split:
        from scipy.io import loadmat  # only needed to rebuild the split

        with open(self.require("cat_to_name.json")) as f:
            cat_to_name = json.load(f)
        groups: dict[int, list[str]] = {}
        for i, y in enumerate(np.ravel(loadmat(self.require("imagelabels.mat"))["labels"]), start=1):
            groups.setdefault(int(y), []).append(os.path.join(self.image_path, f"image_{i:05d}.jpg"))
        out: splits.Split = ([], [], [])
        for y, paths in groups.items():
            for dst, part in zip(out, splits.split_items(paths, 0.5, 0.2, self.rng)):
                dst += [Datum(p, y - 1, classname=cat_to_name[str(y)]) for p in part]
        return out
