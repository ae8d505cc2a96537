"""Describable Textures. Cimpoi et al., "Describing Textures in the Wild", CVPR 2014.
https://www.robots.ox.ac.uk/~vgg/data/dtd/

CoOp's random 50/20/30 split ``split_zhou_DescribableTextures.json`` (upstream: CoOp ``datasets/dtd.py``).
"""

from __future__ import annotations

from vltune.data import CoOpDataset, splits
from vltune.registry import DATASETS


@DATASETS.register()
class DescribableTextures(CoOpDataset):
    dataset_dir = "dtd"
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    template = "{} texture."
    layout = "dtd/  images/, imdb/, labels/, split_zhou_DescribableTextures.json"

    def build_split(self) -> splits.Split:
        return splits.read_and_split_data(self.require(self.image_dir), 0.5, 0.2, rng=self.rng)
