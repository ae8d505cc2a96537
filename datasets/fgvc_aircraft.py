"""FGVC-Aircraft. Maji et al., "Fine-Grained Visual Classification of Aircraft", arXiv 2013.
https://arxiv.org/abs/1306.5151

100 variants; the official train/val/test lists, no split JSON (upstream: CoOp ``datasets/fgvc_aircraft.py``).
"""

from __future__ import annotations

import os

from vltune.data import CoOpDataset, Datum, splits
from vltune.registry import DATASETS


@DATASETS.register()
class FGVCAircraft(CoOpDataset):
    """Label = line index in ``variants.txt``; class name = the variant string ("707-320")."""

    dataset_dir = "fgvc_aircraft"
    image_dir = "images"
    split_file = ""
    template = "a photo of a {}, a type of aircraft."
    layout = "fgvc_aircraft/  images/, variants.txt, images_variant_{train,val,test}.txt  (fgvc-aircraft-2013b/data)"

    def build_split(self) -> splits.Split:
        with open(self.require("variants.txt")) as f:
            cname2lab = {c: i for i, c in enumerate(line.strip() for line in f if line.strip())}

        def read(split: str) -> list[Datum]:
            items = []
            with open(self.require(f"images_variant_{split}.txt")) as f:
                for line in f:
                    imid, _, variant = line.strip().partition(" ")  # "1025794 707-320"
                    if imid:
                        impath = os.path.join(self.image_path, imid + ".jpg")
                        items.append(Datum(impath, cname2lab[variant], classname=variant))
            return items

        return read("train"), read("val"), read("test")
