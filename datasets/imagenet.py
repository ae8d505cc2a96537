"""ImageNet (ILSVRC-2012). Deng et al., "ImageNet: A Large-Scale Hierarchical Image Database", CVPR 2009.
https://image-net.org

No split JSON: label = index of the sorted wnid folders of ``images/train``; ``images/val`` (in wnid folders) is
both val and test; class names from CLIP's ``classnames.txt`` (upstream: CoOp ``datasets/imagenet.py``).
"""

from __future__ import annotations

import os

from vltune.data import CoOpDataset, Datum, cache, load_legacy_pickle, splits
from vltune.registry import DATASETS


@DATASETS.register()
class ImageNet(CoOpDataset):
    """A Dassl ``preprocessed.pkl`` is read when present (its order fixes the few-shot draw); vltune writes none.

    Without it the folders are listed in sorted order (upstream uses the filesystem's ``os.listdir`` order).
    """

    dataset_dir = "imagenet"
    image_dir = "images"
    split_file = ""
    template = "a photo of a {}."
    fewshot_val = False
    layout = "imagenet/  images/train/<wnid>/, images/val/<wnid>/, classnames.txt  (optional: preprocessed.pkl)"

    def build_split(self) -> splits.Split:
        pkl = os.path.join(self.dataset_path, "preprocessed.pkl")
        if os.path.isfile(pkl):
            data = load_legacy_pickle(pkl)
            train, test = self._reroot(data["train"], pkl), self._reroot(data["test"], pkl)
            return train, test, test
        classnames = splits.read_classnames(self.require("classnames.txt"))
        wnids = splits.list_dirs(self.require("images", "train"))
        missing = [w for w in wnids if w not in classnames]
        if missing:
            raise ValueError(f"classnames.txt has no line for {missing[:5]} (of {len(missing)})")

        def read(split: str) -> list[Datum]:
            items = []
            for label, wnid in enumerate(wnids):
                folder = os.path.join(self.image_path, split, wnid)
                if split == "val" and not os.path.isdir(folder):
                    raise self.missing(folder)  # val must be arranged in wnid folders (CoOp#60)
                items += splits.folder_items(folder, label, classnames[wnid])
            return items

        test = read("val")
        return (read("train") if self.load_train else []), test, test

    def _reroot(self, items: list[Datum], pkl: str) -> list[Datum]:
        out = []
        for d in items:
            new = cache.reroot(d.impath, self.image_path, self.dataset_path)
            if new is None:
                raise ValueError(f"{pkl}: cannot map {d.impath!r} under {self.image_path}; delete the stale pickle")
            out.append(Datum(new, d.label, d.domain, d.classname))
        return out
