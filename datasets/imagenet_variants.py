"""Test-only ImageNet variants for domain generalisation (upstream: CoOp ``datasets/imagenet{v2,_sketch,_a,_r}.py``).

* ImageNetV2: Recht et al., "Do ImageNet Classifiers Generalize to ImageNet?", ICML 2019. https://arxiv.org/abs/1902.10811
* ImageNet-Sketch: Wang et al., "Learning Robust Global Representations by Penalizing Local Predictive Power",
  NeurIPS 2019. https://arxiv.org/abs/1905.13549
* ImageNet-A: Hendrycks et al., "Natural Adversarial Examples", CVPR 2021. https://arxiv.org/abs/1907.07174
* ImageNet-R: Hendrycks et al., "The Many Faces of Robustness", ICCV 2021. https://arxiv.org/abs/2006.16241

Each folder needs its own copy of ImageNet's ``classnames.txt``. ``train_x = test``; NUM_SHOTS and
SUBSAMPLE_CLASSES are ignored. ImageNet-A/R have 200 classes: label = index among the sorted wnid folders present,
so the classifier is a 200-way head over those names.
"""

from __future__ import annotations

import os

from vltune.data import CoOpDataset, Datum, splits
from vltune.registry import DATASETS


class ImageNetVariant(CoOpDataset):
    """Label = index of the sorted wnid folders of ``image_dir``; name looked up in ``classnames.txt``."""

    split_file = ""
    template = "a photo of a {}."
    test_only = True
    variant_of = "ImageNet"

    def build_split(self) -> splits.Split:
        classnames = splits.read_classnames(self.require("classnames.txt"))
        return [], [], self.read_test(classnames)

    def read_test(self, classnames: dict[str, str]) -> list[Datum]:
        items = []
        for label, wnid in enumerate(splits.list_dirs(self.require(self.image_dir))):
            if wnid not in classnames:
                raise ValueError(f"{type(self).__name__}: folder {wnid!r} has no line in classnames.txt")
            items += splits.folder_items(os.path.join(self.image_path, wnid), label, classnames[wnid])
        return items


@DATASETS.register()
class ImageNetV2(ImageNetVariant):
    """Folders ``0..999``: label = the folder number, name = that line of ``classnames.txt``."""

    dataset_dir = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"
    layout = "imagenetv2/  imagenetv2-matched-frequency-format-val/{0..999}/, classnames.txt"

    def read_test(self, classnames: dict[str, str]) -> list[Datum]:
        items = []
        for label, name in enumerate(classnames.values()):
            items += splits.folder_items(self.require(self.image_dir, str(label)), label, name)
        return items


@DATASETS.register()
class ImageNetSketch(ImageNetVariant):
    dataset_dir = "imagenet-sketch"
    image_dir = "images"
    layout = "imagenet-sketch/  images/<wnid>/, classnames.txt"


@DATASETS.register()
class ImageNetA(ImageNetVariant):
    dataset_dir = "imagenet-adversarial"
    image_dir = "imagenet-a"
    layout = "imagenet-adversarial/  imagenet-a/<wnid>/ (200 wnids), classnames.txt"


@DATASETS.register()
class ImageNetR(ImageNetVariant):
    dataset_dir = "imagenet-rendition"
    image_dir = "imagenet-r"
    layout = "imagenet-rendition/  imagenet-r/<wnid>/ (200 wnids), classnames.txt"
