"""Damaged data fails early and says which file and what to do.

Each test copies the generated digits dataset into ``tmp_path`` and damages it the way real copies break: a class
without train entries, a truncated image, a cut split JSON, a label/class-name clash. The training-side error and the
dataset checker (``python -m vltune.data check``) must both name the file (and the class or both names/labels).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from vltune.config.defaults import get_cfg_default
from vltune.data.base import MissingClassError, build_dataset
from vltune.data.check import main as check_main
from vltune.data.loader import DataManager, DatasetWrapper, ImageReadError
from vltune.data.splits import SplitFileError


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def root(digits_root: str, tmp_path: Path) -> Path:
    """A private copy of the digits data root, free to damage."""
    out = tmp_path / "data"
    shutil.copytree(Path(digits_root) / "digits", out / "digits")
    return out


def _split_path(root: Path) -> Path:
    return root / "digits" / "split_zhou_Digits.json"


def _edit_split(root: Path, edit) -> None:
    obj = json.loads(_split_path(root).read_text())
    edit(obj)
    _split_path(root).write_text(json.dumps(obj, indent=4, separators=(",", ": ")))


def _cfg(root: Path, subsample: str = "all", shots: int = -1, **dataset: object):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT, cfg.DATASET.NAME, cfg.DATASET.SUBSAMPLE_CLASSES, cfg.DATASET.NUM_SHOTS = (
        str(root),
        "Digits",
        subsample,
        shots,
    )
    for key, value in dataset.items():
        cfg.DATASET[key] = value
    cfg.SEED, cfg.USE_CUDA, cfg.INPUT.SIZE, cfg.INPUT.TRANSFORMS = 1, False, (32, 32), ("normalize",)
    cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 0, 16
    return cfg


def _check(root: Path, capsys) -> str:
    assert check_main(["--root", str(root), "--dataset", "Digits", "--images", "none"]) == 1
    return capsys.readouterr().out


# ------------------------------------------------------------------ 1. a class with no train images
def _drop_train_class(root: Path, label: int) -> None:
    _edit_split(root, lambda obj: obj.__setitem__("train", [e for e in obj["train"] if e[1] != label]))


def test_a_class_without_train_images_stops_a_training_run_naming_class_and_file(root):
    _drop_train_class(root, 2)
    with pytest.raises(MissingClassError) as err:
        build_dataset(_cfg(root, "base", shots=4))
    text = str(err.value)
    assert "label 2 'two'" in text and str(_split_path(root)) in text
    assert "DATASET.ALLOW_MISSING_CLASSES" in text and f"python -m vltune.data check --root {root}" in text


def test_a_class_absent_from_every_split_is_named_by_its_label(root):
    _edit_split(root, lambda obj: [obj.__setitem__(k, [e for e in obj[k] if e[1] != 4]) for k in list(obj)])
    with pytest.raises(MissingClassError, match=r"label 4 \(in no split\)"):
        build_dataset(_cfg(root))


def test_allow_missing_classes_keeps_dassls_silent_shift(root):
    _drop_train_class(root, 2)
    ds = build_dataset(_cfg(root, "base", ALLOW_MISSING_CLASSES=True))
    assert ds.num_classes == 5 and ds.classnames == ["zero", "one", "three", "four", "five"]  # Dassl's result


def test_evaluation_over_the_test_split_still_works(root):
    _drop_train_class(root, 2)
    ds = build_dataset(_cfg(root, "base"), load_train=False)
    assert ds.classnames == ["zero", "one", "two", "three", "four"] and ds.train_x == []


def test_the_checker_names_the_class_without_train_images(root, capsys):
    _drop_train_class(root, 2)
    out = _check(root, capsys)
    assert "none in train (label 2 'two')" in out and str(_split_path(root)) in out


# ------------------------------------------------------------------ 2. an image that does not decode
def _truncate_first_train_image(root: Path) -> Path:
    rel = json.loads(_split_path(root).read_text())["train"][0][0]
    image = root / "digits" / "images" / rel
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return image


def test_a_truncated_image_is_named_with_the_checker_command(root):
    image = _truncate_first_train_image(root)
    dm = DataManager(_cfg(root))
    with pytest.raises(ImageReadError) as err:
        for _ in dm.train_loader_x:
            pass
    text = str(err.value)
    assert str(image) in text and "truncated" in text
    assert f"python -m vltune.data check --root {root} --dataset Digits" in text


def test_a_truncated_image_is_named_from_a_loader_worker(root):
    image = _truncate_first_train_image(root)
    ds = build_dataset(_cfg(root))
    loader = DataLoader(DatasetWrapper(ds.train_x[:2], lambda img: 0), batch_size=2, num_workers=1)
    with pytest.raises(ImageReadError, match=str(image)):
        next(iter(loader))


# ------------------------------------------------------------------ 3. a cut split file
def test_a_cut_split_file_is_named_with_what_to_do(root, capsys):
    data = _split_path(root).read_bytes()
    _split_path(root).write_bytes(data[: len(data) // 2])
    with pytest.raises(SplitFileError) as err:
        build_dataset(_cfg(root))
    for text in (str(err.value), _check(root, capsys)):
        assert f"split file {_split_path(root)}" in text and "not valid JSON" in text
        assert "replace it with CoOp's original split file" in text


def test_a_split_file_of_the_wrong_shape_is_named(root):
    _split_path(root).write_text(json.dumps({"train": [], "val": []}))
    with pytest.raises(SplitFileError, match=f"split file {_split_path(root)} is not a CoOp split"):
        build_dataset(_cfg(root))


# ------------------------------------------------------------------ 4. label / class-name clashes
def _set_val_entry(root: Path, index: int, label: int, name: str) -> str:
    def edit(obj: dict) -> None:
        obj["val"][index][1:] = [label, name]

    _edit_split(root, edit)
    return json.loads(_split_path(root).read_text())["val"][index][0]


def test_a_label_with_two_class_names_names_the_file_and_both_names(root, capsys):
    rel = _set_val_entry(root, 0, 0, "zwei")
    with pytest.raises(SplitFileError) as err:
        build_dataset(_cfg(root))
    for text in (str(err.value), _check(root, capsys)):
        assert f"split file {_split_path(root)}: label 0 has two class names, 'zero'" in text
        assert f"and 'zwei' (val entry {root / 'digits' / 'images' / rel})" in text
        assert "replace it with CoOp's original split file" in text and "restore those class folders" not in text


def test_a_class_name_with_two_labels_names_the_file_and_both_labels(root, capsys):
    _set_val_entry(root, 0, 10, "zero")
    with pytest.raises(SplitFileError) as err:
        build_dataset(_cfg(root))
    for text in (str(err.value), _check(root, capsys)):
        assert f"split file {_split_path(root)}: class name 'zero' has two labels, 0 (train entry" in text
        assert "and 10 (val entry" in text and "restore those class folders" not in text
