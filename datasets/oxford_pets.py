"""Oxford-IIIT Pet. Parkhi et al., "Cats and Dogs", CVPR 2012. https://www.robots.ox.ac.uk/~vgg/data/pets/

37 breeds; CoOp split ``split_zhou_OxfordPets.json`` (upstream: CoOp ``datasets/oxford_pets.py``).
"""

from __future__ import annotations

import os

from vltune.data import CoOpDataset, Datum, splits
from vltune.registry import DATASETS


@DATASETS.register()
class OxfordPets(CoOpDataset):
    """Rebuild: ``annotations/trainval.txt`` → 80/20 train/val, ``annotations/test.txt``; label = column 2 - 1."""

    dataset_dir = "oxford_pets"
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"
    template = "a photo of a {}, a type of pet."
    layout = "oxford_pets/  images/, annotations/, split_zhou_OxfordPets.json"

    def build_split(self) -> splits.Split:
        train, val = splits.split_trainval(self._read("trainval.txt"), 0.2, self.rng)
        return train, val, self._read("test.txt")

    def _read(self, name: str) -> list[Datum]:
        items = []
        with open(self.require("annotations", name)) as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    imname, label, *_ = line.split()  # "Abyssinian_100 1 1 1": breed = name minus "_N", lower-cased
                    breed = imname.rsplit("_", 1)[0].lower()
                    items.append(
                        Datum(os.path.join(self.image_path, imname + ".jpg"), int(label) - 1, classname=breed)
                    )
        return items
