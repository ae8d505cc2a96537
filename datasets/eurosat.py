"""EuroSAT. Helber et al., "EuroSAT: A Novel Dataset and Deep Learning Benchmark for Land Use and Land Cover
Classification", IEEE JSTARS 2019. https://arxiv.org/abs/1709.00029

CoOp split ``split_zhou_EuroSAT.json`` with descriptive class names (upstream: CoOp ``datasets/eurosat.py``).
"""

from __future__ import annotations

from vltune.data import CoOpDataset, splits
from vltune.registry import DATASETS

NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@DATASETS.register()
class EuroSAT(CoOpDataset):
    dataset_dir = "eurosat"
    image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    template = "a centered satellite photo of {}."
    layout = "eurosat/  2750/, split_zhou_EuroSAT.json"

    def build_split(self) -> splits.Split:
        return splits.read_and_split_data(self.require(self.image_dir), 0.5, 0.2, new_cnames=NEW_CNAMES, rng=self.rng)
