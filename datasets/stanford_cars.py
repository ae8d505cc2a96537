"""Stanford Cars. Krause et al., "3D Object Representations for Fine-Grained Categorization", ICCV-W 2013.
https://ai.stanford.edu/~jkrause/cars/car_dataset.html

196 models; CoOp split ``split_zhou_StanfordCars.json`` with paths relative to the dataset folder (upstream: CoOp
``datasets/stanford_cars.py``).
"""

from __future__ import annotations

import os

import numpy as np

from vltune.data import CoOpDataset, Datum, splits
from vltune.registry import DATASETS


@DATASETS.register()
class StanfordCars(CoOpDataset):
    """Rebuild: devkit ``.mat`` annotations (scipy); the year moves to the front ("2012 Tesla Model S Sedan")."""

    dataset_dir = "stanford_cars"
    image_dir = ""
    split_file = "split_zhou_StanfordCars.json"
    template = "a photo of a {}."
    layout = (
        "stanford_cars/  cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat, "
        "split_zhou_StanfordCars.json"
    )

    def build_split(self) -> splits.Split:
        from scipy.io import loadmat  # only needed to rebuild the split

        names = [str(np.squeeze(n)) for n in np.ravel(loadmat(self.require("devkit", "cars_meta.mat"))["class_names"])]

        def read(image_dir: str, anno_file: str) -> list[Datum]:
            items = []
            for a in np.ravel(loadmat(anno_file)["annotations"]):
                label = int(np.squeeze(a["class"])) - 1
                *model, year = names[label].split(" ")
                impath = os.path.join(self.image_path, image_dir, str(np.squeeze(a["fname"])))
                items.append(Datum(impath, label, classname=" ".join([year, *model])))
            return items

        trainval = read("cars_train", self.require("devkit", "cars_train_annos.mat"))
        train, val = splits.split_trainval(trainval, 0.2, self.rng)
        return train, val, read("cars_test", self.require("cars_test_annos_withlabels.mat"))
