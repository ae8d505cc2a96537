"""Every registered CoOp dataset on a generated miniature of its real layout; transforms; DataManager batches."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import pkgutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import datasets
from tests.layouts import RAW_BUILDERS, make_layout, yaml_name
from vltune.config.defaults import get_cfg_default
from vltune.data import CoOpDataset, DataManager, build_data_loader, build_dataset, build_transform
from vltune.data.loader import DatasetWrapper
from vltune.data.transforms import AVAILABLE
from vltune.registry import DATASETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"
for _module in pkgutil.iter_modules(datasets.__path__):  # every dataset file, even before its import line exists
    importlib.import_module(f"datasets.{_module.name}")
NAMES = [n for n in DATASETS.registered_names() if DATASETS.get(n).__module__.startswith("datasets.")]
# MiniBench is tested on its real generated files (test_minibench_data.py); the generic layout ignores test_only.
LOADABLE = [n for n in NAMES if DATASETS.get(n).__module__ != "datasets.minibench"]
COOP15 = [
    "ImageNet",
    "Caltech101",
    "OxfordPets",
    "StanfordCars",
    "OxfordFlowers",
    "Food101",
    "FGVCAircraft",
    "SUN397",
    "DescribableTextures",
    "EuroSAT",
    "UCF101",
    "ImageNetV2",
    "ImageNetSketch",
    "ImageNetA",
    "ImageNetR",
]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "cache"))


def _cfg(root: Path, name: str, shots: int = -1, subsample: str = "all", seed: int = 1):
    cfg = get_cfg_default()
    if (
        CONFIGS / f"{yaml_name(name)}.yaml"
    ).is_file():  # the 15 always have one (test_all_fifteen_registered_with_yaml)
        cfg.merge_from_file(str(CONFIGS / f"{yaml_name(name)}.yaml"))
    cfg.DATASET.NAME = name
    cfg.DATASET.ROOT, cfg.DATASET.NUM_SHOTS, cfg.DATASET.SUBSAMPLE_CLASSES, cfg.SEED = (
        str(root),
        shots,
        subsample,
        seed,
    )
    cfg.INPUT.SIZE, cfg.INPUT.INTERPOLATION = (32, 32), "bicubic"
    cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD = CLIP_MEAN, CLIP_STD
    cfg.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
    cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.TRAIN_X.BATCH_SIZE, cfg.DATALOADER.TEST.BATCH_SIZE = 0, 4, 5
    cfg.USE_CUDA = False
    return cfg


def _check(ds, layout) -> None:
    assert ds.classnames == layout.classnames
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (layout.n_train, layout.n_val, layout.n_test)
    assert ds.num_classes == len(layout.classnames) and ds.lab2cname == dict(enumerate(layout.classnames))
    for d in ds.train_x + ds.val + ds.test:
        assert os.path.isfile(d.impath), d.impath
        assert d.classname == layout.classnames[d.label]
    assert {d.label for d in ds.test} == set(range(ds.num_classes))


def test_all_fifteen_registered_with_yaml():
    assert set(COOP15) <= set(NAMES)
    for name in COOP15:
        with open(CONFIGS / f"{yaml_name(name)}.yaml") as f:
            assert yaml.safe_load(f) == {"DATASET": {"NAME": name}}


# CoOp's CUSTOM_TEMPLATES (methods.md §1): each dataset class carries its entry as ``template``.
COOP_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.", "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.", "SUN397": "a photo of a {}.", "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.", "ImageNet": "a photo of a {}.", "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.", "ImageNetA": "a photo of a {}.", "ImageNetR": "a photo of a {}.",
}


@pytest.mark.parametrize("name", sorted(COOP_TEMPLATES))
def test_dataset_template_is_coops(name):
    assert DATASETS.get(name).template == COOP_TEMPLATES[name]


@pytest.mark.parametrize("name", LOADABLE)
def test_dataset_loads(tmp_path, name, caplog):
    layout = make_layout(name, tmp_path)
    with caplog.at_level(logging.INFO):
        ds = build_dataset(_cfg(tmp_path, name))
    assert f"Loading dataset: {name}" in caplog.text
    assert isinstance(ds, CoOpDataset) and "{}" in type(ds).template
    _check(ds, layout)
    if ds.test_only:
        assert ds.train_x == ds.test and not ds.val


@pytest.mark.parametrize("name", RAW_BUILDERS)
def test_split_rebuilt_from_raw_files(tmp_path, name):
    """Without the JSON, the class-name rules (renames, year first, CamelCase, ...) apply and the split is saved."""
    layout = make_layout(name, tmp_path, raw=True)
    ds = build_dataset(_cfg(tmp_path, name))
    _check(ds, layout)
    cls = DATASETS.get(name)
    split_path = tmp_path / cls.dataset_dir / cls.split_file
    saved = json.loads(split_path.read_text())
    assert len(saved["train"]) == layout.n_train and not os.path.isabs(saved["test"][0][0])
    again = build_dataset(_cfg(tmp_path, name, seed=2))  # a different seed reads the saved split
    assert (again.train_x, again.val, again.test) == (ds.train_x, ds.val, ds.test)


@pytest.mark.parametrize("name", ["OxfordPets", "EuroSAT", "Caltech101", "ImageNet", "FGVCAircraft"])
@pytest.mark.parametrize("subsample", ["base", "new"])
def test_fewshot_base_new(tmp_path, name, subsample):
    layout = make_layout(name, tmp_path)
    ds = build_dataset(_cfg(tmp_path, name, shots=2, subsample=subsample))
    m = math.ceil(len(layout.classnames) / 2)
    expected = layout.classnames[:m] if subsample == "base" else layout.classnames[m:]
    assert ds.classnames == expected and ds.num_classes == len(expected)
    assert Counter(d.label for d in ds.train_x) == {y: 2 for y in range(len(expected))}
    assert all(d.classname == expected[d.label] for d in ds.train_x + ds.val + ds.test)
    per_class_test = layout.n_test // len(layout.classnames)
    assert len(ds.test) == per_class_test * len(expected)  # the full test split of the kept classes
    eval_only = build_dataset(_cfg(tmp_path, name, shots=2, subsample=subsample), load_train=False)
    assert eval_only.lab2cname == ds.lab2cname and eval_only.test == ds.test and eval_only.train_x == []


def test_test_only_datasets_ignore_shots_and_subsample(tmp_path):
    layout = make_layout("ImageNetA", tmp_path)
    ds = build_dataset(_cfg(tmp_path, "ImageNetA", shots=1, subsample="base"))
    _check(ds, layout)  # 3 present wnids of 5 in classnames.txt → a 3-way head, README.txt skipped
    assert not (tmp_path / "imagenet-adversarial" / "split_fewshot").exists()


@pytest.mark.parametrize("name", NAMES)
def test_missing_folder_names_expected_layout(tmp_path, name):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(_cfg(tmp_path, name))
    cls = DATASETS.get(name)
    assert str(tmp_path / cls.dataset_dir) in str(err.value) and "Expected layout" in str(err.value)
    assert cls.dataset_dir in str(err.value).split("Expected layout")[1]


def test_missing_split_and_annotations_named(tmp_path):
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"annotations/trainval\.txt") as err:
        build_dataset(_cfg(tmp_path, "OxfordPets"))
    assert "split_zhou_OxfordPets.json" in str(err.value)

    class JsonOnly(CoOpDataset):  # the shape of a JSON-only dataset such as Digits: no build_split needed
        dataset_dir, image_dir, split_file = "digits", "images", "split_zhou_Digits.json"

    (tmp_path / "digits").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split_zhou_Digits\.json"):
        JsonOnly(_cfg(tmp_path, "OxfordPets"))


# ------------------------------------------------------------------ transforms
def test_transforms_shapes_and_errors(tmp_path):
    cfg = _cfg(tmp_path, "OxfordPets")
    img = Image.new("RGB", (50, 20), (200, 10, 10))
    assert build_transform(cfg, is_train=True)(img).shape == (3, 32, 32)
    out = build_transform(cfg, is_train=False)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (200 / 255 - CLIP_MEAN[0]) / CLIP_STD[0]  # uniform image: normalised value everywhere
    assert torch.allclose(out[0], torch.full((32, 32), expected), atol=1e-2)
    big = Image.new("RGB", (50, 40), (10, 200, 10))  # random_crop alone does not resize first (Dassl)
    for name in AVAILABLE:
        cfg.INPUT.TRANSFORMS = (name,)
        cfg.INPUT.GB_K = 3
        assert build_transform(cfg, is_train=True)(big).shape == (3, 32, 32), name
    cfg.INPUT.TRANSFORMS = ("random_flip", "random_rotate")
    with pytest.raises(ValueError, match=r"'random_rotate'.*valid: random_flip"):
        build_transform(cfg, is_train=True)
    cfg.INPUT.TRANSFORMS = ("randaugment2",)
    with pytest.raises(ValueError, match="randaugment2"):
        build_transform(cfg, is_train=True)


# ------------------------------------------------------------------ loaders
def test_data_manager_batches(tmp_path, caplog):
    make_layout("OxfordPets", tmp_path)
    cfg = _cfg(tmp_path, "OxfordPets", shots=3)
    with caplog.at_level(logging.INFO):
        dm = DataManager(cfg)
    assert "# train_x  9" in caplog.text and dm.classnames == ["abyssinian", "american_bulldog", "bengal"]
    assert dm.num_classes == 3 and dm.lab2cname == {0: "abyssinian", 1: "american_bulldog", 2: "bengal"}
    assert len(dm.train_loader_x) == 2  # 9 images, batch 4, drop_last
    batch = next(iter(dm.train_loader_x))
    assert set(batch) == {"img", "label", "index", "impath", "domain"}
    assert batch["img"].shape == (4, 3, 32, 32) and batch["img"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["index"].shape == (4,) and batch["domain"].shape == (4,)
    assert isinstance(batch["impath"], list) and all(isinstance(p, str) for p in batch["impath"])
    assert [dm.dataset.train_x[i].label for i in batch["index"]] == batch["label"].tolist()
    assert sum(len(b["label"]) for b in dm.test_loader) == len(dm.dataset.test) == 9  # no drop_last at test
    assert sum(len(b["label"]) for b in dm.val_loader) == 6  # min(3, 4) of 2 val images per class


def test_data_manager_seeded_order_and_augmentation_repeat(tmp_path):
    make_layout("OxfordPets", tmp_path)
    cfg = _cfg(tmp_path, "OxfordPets", shots=3)
    cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.K_TRANSFORMS, cfg.DATALOADER.RETURN_IMG0 = 1, 2, True
    a, b = (next(iter(DataManager(cfg).train_loader_x)) for _ in range(2))
    assert isinstance(a["img"], list) and len(a["img"]) == 2 and a["img"][0].shape == (4, 3, 32, 32)
    assert a["img0"].shape == (4, 3, 32, 32)
    assert torch.equal(a["index"], b["index"]) and all(torch.equal(x, y) for x, y in zip(a["img"], b["img"]))


def test_deterministic_training_items_are_read_from_disk_once_and_equal(tmp_path, monkeypatch):
    import vltune.data.loader as loader_module

    make_layout("OxfordPets", tmp_path)
    reads: list[str] = []
    real_open = loader_module.open_image
    monkeypatch.setattr(loader_module, "open_image",
                        lambda path, checker: reads.append(path) or real_open(path, checker))
    cfg = _cfg(tmp_path, "OxfordPets", shots=3)
    cfg.DATALOADER.NUM_WORKERS, cfg.INPUT.TRANSFORMS = 0, ("normalize",)
    dm = DataManager(cfg)
    epochs = [[(b["index"].tolist(), b["img"]) for b in dm.train_loader_x] for _ in range(3)]
    train_paths = {d.impath for d in dm.dataset.train_x}
    assert sorted(p for p in reads if p in train_paths) == sorted(set(reads) & train_paths)  # each read once
    fresh = DatasetWrapper(dm.dataset.train_x, dm.tfm_train)  # no cache: what a disk read gives
    for batches in epochs[1:]:
        for indices, images in batches:
            assert torch.equal(images, torch.stack([fresh[i]["img"] for i in indices]))
    reads.clear()
    cfg.INPUT.TRANSFORMS = ("random_flip", "normalize")  # random: every epoch reads and draws again
    dm = DataManager(cfg)
    for _ in range(2):
        list(dm.train_loader_x)
    assert len(reads) == 2 * len(dm.train_loader_x) * 4


def test_the_item_cache_stops_at_its_byte_budget(tmp_path):
    make_layout("OxfordPets", tmp_path)
    dm = DataManager(_cfg(tmp_path, "OxfordPets", shots=3))
    one = DatasetWrapper(dm.dataset.train_x, dm.tfm_test)[0]["img"].nbytes
    wrapper = DatasetWrapper(dm.dataset.train_x, dm.tfm_test, cache_bytes=2 * one)
    for i in range(len(wrapper)):
        wrapper[i]
    assert sorted(wrapper._cache) == [0, 1] and wrapper._cached_bytes == 2 * one


def test_eval_only_and_test_only_have_no_train_loader(tmp_path):
    make_layout("OxfordPets", tmp_path)
    dm = DataManager(_cfg(tmp_path, "OxfordPets", shots=2), load_train=False)
    assert dm.train_loader_x is None and dm.val_loader is None and dm.num_classes == 3
    make_layout("ImageNetR", tmp_path)
    dm = DataManager(_cfg(tmp_path, "ImageNetR"))
    assert dm.train_loader_x is None and dm.val_loader is None and dm.num_classes == 2
    with pytest.raises(ValueError, match="empty"):
        build_data_loader(
            _cfg(tmp_path, "ImageNetR"), [], dm.tfm_test, sampler="SequentialSampler", batch_size=2, is_train=False
        )
