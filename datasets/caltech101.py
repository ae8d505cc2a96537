"""Caltech-101. Fei-Fei et al., "Learning Generative Visual Models from Few Training Examples", CVPR-W 2004.
https://data.caltech.edu/records/mzrjq-6wc02

100 object classes (background excluded); CoOp split ``split_zhou_Caltech101.json`` (upstream: CoOp
``datasets/caltech101.py``).
"""

from __future__ import annotations

from vltune.data import CoOpDataset, splits
from vltune.registry import DATASETS

IGNORED = ("BACKGROUND_Google", "Faces_easy")
NEW_CNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


@DATASETS.register()
class Caltech101(CoOpDataset):
    dataset_dir = "caltech-101"
    image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    template = "a photo of a {}."
    layout = "caltech-101/  101_ObjectCategories/, split_zhou_Caltech101.json"

    def build_split(self) -> splits.Split:
        return splits.read_and_split_data(self.require(self.image_dir), 0.5, 0.2, IGNORED, NEW_CNAMES, self.rng)
