"""Digits: scikit-learn's copy of the UCI handwritten digits (Alpaydin & Kaynak, 1998), 10 classes, generated
offline in CoOp layout by ``vltune.data.synthetic.write_digits_dataset``. The first MiniBench dataset: small, real,
and learnable by a tiny CLIP in seconds.
"""

from __future__ import annotations

from vltune.data import CoOpDataset
from vltune.registry import DATASETS


@DATASETS.register()
class Digits(CoOpDataset):
    dataset_dir = "digits"
    image_dir = "images"
    split_file = "split_zhou_Digits.json"
    template = "a photo of the number {}."
