"""SUN397. Xiao et al., "SUN Database: Large-scale Scene Recognition from Abbey to Zoo", CVPR 2010.
https://vision.princeton.edu/projects/2010/SUN/

CoOp split ``split_zhou_SUN397.json`` (upstream: CoOp ``datasets/sun397.py``).
"""

from __future__ import annotations

import os

from vltune.data import CoOpDataset, Datum, splits
from vltune.registry import DATASETS


def sun_classname(folder: str) -> str:
    """ "a/apartment_building/outdoor" → "outdoor apartment_building": drop the letter, reverse the rest."""
    return " ".join(folder.split("/")[1:][::-1])


@DATASETS.register()
class SUN397(CoOpDataset):
    """Rebuild: ``ClassName.txt``, ``Training_01.txt`` → 80/20 train/val, ``Testing_01.txt``."""

    dataset_dir = "sun397"
    image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    template = "a photo of a {}."
    layout = "sun397/  SUN397/, ClassName.txt, Training_01.txt, Testing_01.txt, split_zhou_SUN397.json"

    def build_split(self) -> splits.Split:
        with open(self.require("ClassName.txt")) as f:
            cname2lab = {c: i for i, c in enumerate(line.strip().lstrip("/") for line in f if line.strip())}

        def read(name: str) -> list[Datum]:
            with open(self.require(name)) as f:
                imnames = [line.strip().lstrip("/") for line in f if line.strip()]  # "/a/abbey/sun_xxx.jpg"
            return [
                Datum(
                    os.path.join(self.image_path, im),
                    cname2lab[os.path.dirname(im)],
                    classname=sun_classname(os.path.dirname(im)),
                )
                for im in imnames
            ]

        train, val = splits.split_trainval(read("Training_01.txt"), 0.2, self.rng)
        return train, val, read("Testing_01.txt")
