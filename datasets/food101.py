"""Food-101. Bossard et al., "Food-101 - Mining Discriminative Components with Random Forests", ECCV 2014.
https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/

CoOp's random 50/20/30 split ``split_zhou_Food101.json``, not the official split (upstream: CoOp
``datasets/food101.py``).
"""

from __future__ import annotations

from vltune.data import CoOpDataset, splits
from vltune.registry import DATASETS


@DATASETS.register()
class Food101(CoOpDataset):
    dataset_dir = "food-101"
    image_dir = "images"
    split_file = "split_zhou_Food101.json"
    template = "a photo of {}, a type of food."
    layout = "food-101/  images/, meta/, split_zhou_Food101.json"

    def build_split(self) -> splits.Split:
        return splits.read_and_split_data(self.require(self.image_dir), 0.5, 0.2, rng=self.rng)
