"""UCF101 (middle frames). Soomro et al., "UCF101: A Dataset of 101 Human Actions Classes From Videos in The Wild",
arXiv 2012. https://arxiv.org/abs/1212.0402

CoOp split ``split_zhou_UCF101.json`` over the extracted middle frames (upstream: CoOp ``datasets/ucf101.py``).
"""

from __future__ import annotations

import os
import re

from vltune.data import CoOpDataset, Datum, splits
from vltune.registry import DATASETS


def ucf_classname(action: str) -> str:
    """CamelCase action → folder and class name: "ApplyEyeMakeup" → "Apply_Eye_Makeup"."""
    return "_".join(re.findall(r"[A-Z][^A-Z]*", action))


@DATASETS.register()
class UCF101(CoOpDataset):
    """Rebuild: ``ucfTrainTestlist/classInd.txt``, ``trainlist01.txt`` → 80/20 train/val, ``testlist01.txt``."""

    dataset_dir = "ucf101"
    image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    template = "a photo of a person doing {}."
    layout = "ucf101/  UCF-101-midframes/, split_zhou_UCF101.json  (rebuild: ucfTrainTestlist/)"

    def build_split(self) -> splits.Split:
        cname2lab = {}
        with open(self.require("ucfTrainTestlist", "classInd.txt")) as f:
            for line in f:
                if line.strip():
                    label, action = line.split()
                    cname2lab[action] = int(label) - 1

        def read(name: str) -> list[Datum]:
            items = []
            with open(self.require("ucfTrainTestlist", name)) as f:
                for line in f:
                    if line.strip():  # "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
                        action, video = line.split()[0].split("/")
                        cname = ucf_classname(action)
                        impath = os.path.join(self.image_path, cname, video.replace(".avi", ".jpg"))
                        items.append(Datum(impath, cname2lab[action], classname=cname))
            return items

        train, val = splits.split_trainval(read("trainlist01.txt"), 0.2, self.rng)
        return train, val, read("testlist01.txt")
