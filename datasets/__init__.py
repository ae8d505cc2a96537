"""The CoOp datasets; importing this package registers them in ``vltune.registry.DATASETS``.

Add a dataset with one import line below; the modules are imported for their registration side effect.
"""

# ruff: noqa: F401

import datasets.caltech101
import datasets.digits
import datasets.dtd
import datasets.eurosat
import datasets.fgvc_aircraft
import datasets.food101
import datasets.imagenet
import datasets.imagenet_variants
import datasets.minibench
import datasets.oxford_flowers
import datasets.oxford_pets
import datasets.stanford_cars
import datasets.sun397
import datasets.ucf101
from vltune.registry import DATASETS, mirror_into_dassl

mirror_into_dassl(DATASETS, "dassl.data.datasets", "DATASET_REGISTRY")
