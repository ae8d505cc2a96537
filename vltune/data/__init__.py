"""Data layer: ``Datum``, split utilities, the CoOp dataset family, CLIP transforms and loaders."""

from vltune.data import cache, splits
from vltune.data.base import CoOpDataset, DatasetBase, build_dataset
from vltune.data.datum import Datum, load_legacy_pickle
from vltune.data.loader import DataManager, build_data_loader
from vltune.data.transforms import build_transform

__all__ = [
    "CoOpDataset",
    "DataManager",
    "DatasetBase",
    "Datum",
    "build_data_loader",
    "build_dataset",
    "build_transform",
    "load_legacy_pickle",
    "cache",
    "splits",
]
