"""Split JSON io, Dassl-identical few-shot draws, base/new subsampling, legacy pickles and the few-shot cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

import datasets  # noqa: F401  (registers the CoOp datasets)
from tests.layouts import make_layout
from vltune.config.defaults import get_cfg_default
from vltune.data import Datum, build_dataset, load_legacy_pickle, splits


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "cache"))


def _cfg(root: Path, name: str = "OxfordPets", shots: int = -1, seed: int = 1, subsample: str = "all"):
    cfg = get_cfg_default()
    cfg.DATASET.ROOT, cfg.DATASET.NAME, cfg.DATASET.NUM_SHOTS = str(root), name, shots
    cfg.DATASET.SUBSAMPLE_CLASSES, cfg.SEED = subsample, seed
    return cfg


# ------------------------------------------------------------------ split JSON
def test_split_json_roundtrip_is_byte_identical(tmp_path):
    obj = {
        "train": [["a/x_1.jpg", 0, "caf\u00e9 au lait"], ["b/x_2.jpg", 1, "b"]],
        "val": [["a/x_3.jpg", 0, "caf\u00e9 au lait"]],
        "test": [["b/sub/x_4.jpg", 1, "b"]],
    }
    src, dst = tmp_path / "split.json", tmp_path / "copy.json"
    with open(src, "w") as f:  # exactly Dassl's write_json
        json.dump(obj, f, indent=4, separators=(",", ": "))
    prefix = str(tmp_path / "images")
    train, val, test = splits.read_split(str(src), prefix)
    assert train[0] == Datum(os.path.join(prefix, "a/x_1.jpg"), 0, 0, "caf\u00e9 au lait")
    assert [d.label for d in train] == [0, 1] and isinstance(test[0].label, int) and len(val) == 1
    splits.save_split(train, val, test, str(dst), prefix)
    assert dst.read_bytes() == src.read_bytes()


# ------------------------------------------------------------------ few-shot draw
TRAIN_LABELS = [2, 0, 0, 1, 2, 1, 0, 3, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1]  # first appearance 2, 0, 1, 3; class 3 has 1
VAL_LABELS = [1, 0, 2, 3, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2]
TRAIN = [Datum(f"c{y}/train_{i:02d}.jpg", y, classname=f"class{y}") for i, y in enumerate(TRAIN_LABELS)]
VAL = [Datum(f"c{y}/val_{i:02d}.jpg", y, classname=f"class{y}") for i, y in enumerate(VAL_LABELS)]

# Computed once with `dassl_reference` below (Dassl's algorithm: global random.seed(s), per label in first-appearance
# order random.sample, train with K then val with min(K, 4)) and hard-coded, so a change of either side is caught.
EXPECTED_K2 = {
    1: (
        [
            "c2/train_04.jpg",
            "c2/train_14.jpg",
            "c0/train_01.jpg",
            "c0/train_06.jpg",
            "c1/train_03.jpg",
            "c1/train_12.jpg",
            "c3/train_07.jpg",
        ],
        [
            "c1/val_10.jpg",
            "c1/val_13.jpg",
            "c0/val_11.jpg",
            "c0/val_05.jpg",
            "c2/val_02.jpg",
            "c2/val_12.jpg",
            "c3/val_03.jpg",
        ],
    ),
    2: (
        [
            "c2/train_00.jpg",
            "c2/train_17.jpg",
            "c0/train_01.jpg",
            "c0/train_06.jpg",
            "c1/train_05.jpg",
            "c1/train_09.jpg",
            "c3/train_07.jpg",
        ],
        [
            "c1/val_07.jpg",
            "c1/val_04.jpg",
            "c0/val_14.jpg",
            "c0/val_01.jpg",
            "c2/val_15.jpg",
            "c2/val_06.jpg",
            "c3/val_03.jpg",
        ],
    ),
    3: (
        [
            "c2/train_04.jpg",
            "c2/train_14.jpg",
            "c0/train_13.jpg",
            "c0/train_02.jpg",
            "c1/train_09.jpg",
            "c1/train_15.jpg",
            "c3/train_07.jpg",
        ],
        [
            "c1/val_10.jpg",
            "c1/val_00.jpg",
            "c0/val_14.jpg",
            "c0/val_01.jpg",
            "c2/val_12.jpg",
            "c2/val_09.jpg",
            "c3/val_03.jpg",
        ],
    ),
}


def dassl_reference(train: list[Datum], val: list[Datum], k: int, seed: int) -> tuple[list[str], list[str]]:
    """Independent re-statement of Dassl's generate_fewshot_dataset on the global RNG (state restored after)."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for source, n in ((train, k), (val, min(k, 4))):
            groups: dict[int, list[Datum]] = {}
            for item in source:
                groups.setdefault(item.label, []).append(item)
            picked = []
            for items in groups.values():
                picked += random.sample(items, n) if len(items) >= n else items
            out.append([d.impath for d in picked])
        return out[0], out[1]
    finally:
        random.setstate(state)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fewshot_draw_equals_dassl(seed):
    assert dassl_reference(TRAIN, VAL, 2, seed) == EXPECTED_K2[seed]
    rng = random.Random(seed)
    train = splits.generate_fewshot(TRAIN, 2, rng)
    val = splits.generate_fewshot(VAL, min(2, 4), rng)
    assert ([d.impath for d in train], [d.impath for d in val]) == EXPECTED_K2[seed]


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_fewshot_counts(k):
    rng = random.Random(0)
    train, val = splits.generate_fewshot(TRAIN, k, rng), splits.generate_fewshot(VAL, min(k, 4), rng)
    sizes_train, sizes_val = Counter(TRAIN_LABELS), Counter(VAL_LABELS)
    assert Counter(d.label for d in train) == {y: min(k, n) for y, n in sizes_train.items()}
    assert Counter(d.label for d in val) == {y: min(k, 4, n) for y, n in sizes_val.items()}
    assert len(set(train)) == len(train)  # sampled without replacement
    assert splits.generate_fewshot(TRAIN, 0, rng) == TRAIN  # K < 1: unchanged
    assert len(splits.generate_fewshot(TRAIN, 3, rng, repeat=True)) == 4 * 3  # repeat pads the short class


def test_dataset_fewshot_equals_dassl_on_split_json(tmp_path):
    """CoOpDataset draws with Random(SEED) train-then-val, as Dassl's seeded global random does."""
    make_layout("OxfordPets", tmp_path)
    prefix = str(tmp_path / "oxford_pets" / "images")
    train, val, _ = splits.read_split(str(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"), prefix)
    for seed in (1, 2):
        ds = build_dataset(_cfg(tmp_path, shots=2, seed=seed))
        assert ([d.impath for d in ds.train_x], [d.impath for d in ds.val]) == dassl_reference(train, val, 2, seed)


# ------------------------------------------------------------------ base / new
def test_subsample_base_new_counts_and_relabel():
    items = [Datum(f"{y}.jpg", y, classname=f"c{y}") for y in (4, 0, 2, 1, 3)]
    extra = [Datum("t.jpg", 3, classname="c3"), Datum("u.jpg", 0, classname="c0")]
    base_train, base_test = splits.subsample_classes(items, extra, subsample="base")
    new_train, new_test = splits.subsample_classes(items, extra, subsample="new")
    assert sorted((d.label, d.classname) for d in base_train) == [(0, "c0"), (1, "c1"), (2, "c2")]  # ceil(5/2) = 3
    assert sorted((d.label, d.classname) for d in new_train) == [(0, "c3"), (1, "c4")]
    assert [(d.impath, d.label) for d in base_test] == [("u.jpg", 0)]
    assert [(d.impath, d.label) for d in new_test] == [("t.jpg", 0)]
    assert splits.subsample_classes(items, subsample="all")[0] == items
    with pytest.raises(ValueError, match="all, base or new"):
        splits.subsample_classes(items, subsample="novel")


def test_subsample_logs(caplog):
    with caplog.at_level(logging.INFO):
        splits.subsample_classes(TRAIN, subsample="base")
        splits.subsample_classes(TRAIN, subsample="new")
    assert "SUBSAMPLE BASE CLASSES!" in caplog.text and "SUBSAMPLE NEW CLASSES!" in caplog.text


# ------------------------------------------------------------------ legacy pickles
DASSL_MODULES = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]


def dassl_pickle(path: Path, make) -> None:
    """Pickle ``make(DasslDatum)`` with a stand-in for dassl's Datum, then uninstall it again."""

    class DasslDatum:  # the attribute layout of dassl.data.datasets.base_dataset.Datum
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    DasslDatum.__module__, DasslDatum.__qualname__, DasslDatum.__name__ = DASSL_MODULES[-1], "Datum", "Datum"
    saved = {n: sys.modules.get(n) for n in DASSL_MODULES}
    try:
        for n in DASSL_MODULES:
            sys.modules[n] = types.ModuleType(n)
        sys.modules[DASSL_MODULES[-1]].Datum = DasslDatum
        path.write_bytes(pickle.dumps(make(DasslDatum), protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        for n, m in saved.items():
            if m is None:
                del sys.modules[n]
            else:
                sys.modules[n] = m


def test_legacy_pickle_loads_as_vltune_datum(tmp_path):
    path = tmp_path / "shot_1-seed_1.pkl"
    dassl_pickle(path, lambda D: {"train": [D("/x/a.jpg", 3, 0, "cat")], "val": [D("/x/b.jpg", 1, 0, "dog")]})
    assert "dassl" not in sys.modules
    data = load_legacy_pickle(str(path))
    assert data == {"train": [Datum("/x/a.jpg", 3, 0, "cat")], "val": [Datum("/x/b.jpg", 1, 0, "dog")]}
    assert type(data["train"][0]) is Datum


class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize(
    "func,arg_fmt,refused",
    [
        (os.system, "touch {m}", "system"),
        (eval, "open({m!r}, 'w').close()", "builtins.eval"),
    ],
)
def test_legacy_pickle_refuses_other_globals(tmp_path, func, arg_fmt, refused):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"train": [_Payload(func, arg_fmt.format(m=marker))]}))
    with pytest.raises(pickle.UnpicklingError, match=refused):
        load_legacy_pickle(str(path))
    assert not os.path.exists(marker)


def test_legacy_pickle_refuses_unlisted_class(tmp_path):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"train": Counter("ab")}))
    with pytest.raises(pickle.UnpicklingError, match=r"collections\.Counter"):
        load_legacy_pickle(str(path))


def test_legacy_fewshot_pickle_is_rerooted(tmp_path, caplog):
    make_layout("OxfordPets", tmp_path)
    base = tmp_path / "oxford_pets"
    prefix = str(base / "images")
    train, val, _ = splits.read_split(str(base / "split_zhou_OxfordPets.json"), prefix)
    old = "/home/someone/DATA/oxford_pets/images/"
    chosen_train, chosen_val = train[:1] + train[4:5], val[:1]  # not what a fresh draw would pick
    (base / "split_fewshot").mkdir()
    pkl = base / "split_fewshot" / "shot_1-seed_1.pkl"
    dassl_pickle(
        pkl,
        lambda D: {
            k: [D(old + os.path.relpath(d.impath, prefix), d.label, 0, d.classname) for d in v]
            for k, v in (("train", chosen_train), ("val", chosen_val))
        },
    )
    with caplog.at_level(logging.INFO):
        ds = build_dataset(_cfg(tmp_path, shots=1))
    assert ds.train_x == chosen_train and ds.val == chosen_val
    assert f"Loading preprocessed few-shot data from {pkl}" in caplog.text
    assert not list((base / "split_fewshot").glob("*.json"))  # nothing re-drawn or written

    dassl_pickle(pkl, lambda D: {"train": [D(old + "Abyssinian_999.jpg", 0, 0, "abyssinian")], "val": []})
    ds = build_dataset(_cfg(tmp_path, shots=1))  # a stale pickle is ignored and the draw repeated
    assert ([d.impath for d in ds.train_x], [d.impath for d in ds.val]) == dassl_reference(train, val, 1, 1)


def test_imagenet_preprocessed_pickle_is_rerooted(tmp_path):
    make_layout("ImageNet", tmp_path)
    base = tmp_path / "imagenet"
    items = [("train/n01443537/only.JPEG", 1, "goldfish"), ("train/n01440764/one.JPEG", 0, "tench")]
    tests = [("val/n01440764/v.JPEG", 0, "tench")]
    old = "/mnt/old/imagenet/images/"
    dassl_pickle(
        base / "preprocessed.pkl",
        lambda D: {
            "train": [D(old + p, y, 0, c) for p, y, c in items],
            "test": [D(old + p, y, 0, c) for p, y, c in tests],
        },
    )
    ds = build_dataset(_cfg(tmp_path, name="ImageNet"))
    assert [d.impath for d in ds.train_x] == [str(base / "images" / p) for p, _, _ in items]  # pickle order kept
    assert ds.test == ds.val and ds.test[0].impath == str(base / "images" / tests[0][0])
    assert ds.classnames == ["tench", "goldfish"]


# ------------------------------------------------------------------ few-shot cache
def _deny_writes_under(monkeypatch, root: Path) -> None:
    """Simulate a read-only data root (chmod alone does not stop root, so os.access is patched too)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(path).startswith(str(root)):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_cache_written_next_to_data_when_writable(tmp_path):
    make_layout("OxfordPets", tmp_path / "data")
    ds = build_dataset(_cfg(tmp_path / "data", shots=2))
    path = tmp_path / "data" / "oxford_pets" / "split_fewshot" / "shot_2-seed_1.json"
    obj = json.loads(path.read_text())
    split_bytes = (tmp_path / "data" / "oxford_pets" / "split_zhou_OxfordPets.json").read_bytes()
    assert obj["split_sha256"] == hashlib.sha256(split_bytes).hexdigest()
    assert [p for p, _, _ in obj["train"]] == [os.path.relpath(d.impath, ds.image_path) for d in ds.train_x]
    assert not any(os.path.isabs(p) for p, _, _ in obj["train"] + obj["val"])
    assert not list(tmp_path.rglob("*.pkl"))


def test_cache_falls_back_to_cache_dir_when_root_read_only(tmp_path, monkeypatch, caplog):
    data = tmp_path / "data"
    make_layout("OxfordPets", data)
    _deny_writes_under(monkeypatch, data)
    os.chmod(data / "oxford_pets", 0o555)  # also effective when the tests do not run as root
    try:
        first = build_dataset(_cfg(data, shots=2))
        cached = tmp_path / "cache" / "fewshot" / "oxford_pets" / "shot_2-seed_1.json"
        assert cached.is_file()
        assert not (data / "oxford_pets" / "split_fewshot").exists()  # no mkdir inside the read-only root
        caplog.clear()  # only the second build's records count
        with caplog.at_level(logging.INFO):
            second = build_dataset(_cfg(data, shots=2))
        assert f"Loading preprocessed few-shot data from {cached}" in caplog.text
        assert "Creating a 2-shot dataset" not in caplog.text
        assert second.train_x == first.train_x and second.val == first.val
    finally:
        os.chmod(data / "oxford_pets", 0o755)


def test_cache_invalidated_when_split_changes(tmp_path, caplog):
    make_layout("OxfordPets", tmp_path)
    base = tmp_path / "oxford_pets"
    build_dataset(_cfg(tmp_path, shots=2))
    split_path = base / "split_zhou_OxfordPets.json"
    obj = json.loads(split_path.read_text())
    obj["train"] = obj["train"][1:]  # a new split version
    with open(split_path, "w") as f:
        json.dump(obj, f, indent=4, separators=(",", ": "))
    with caplog.at_level(logging.INFO):
        ds = build_dataset(_cfg(tmp_path, shots=2))
    assert "Creating a 2-shot dataset" in caplog.text
    cache = json.loads((base / "split_fewshot" / "shot_2-seed_1.json").read_text())
    assert cache["split_sha256"] == hashlib.sha256(split_path.read_bytes()).hexdigest()
    train, val, _ = splits.read_split(str(split_path), str(base / "images"))
    assert ([d.impath for d in ds.train_x], [d.impath for d in ds.val]) == dassl_reference(train, val, 2, 1)


def test_unseeded_draw_is_not_cached(tmp_path):
    make_layout("OxfordPets", tmp_path)
    ds = build_dataset(_cfg(tmp_path, shots=2, seed=-1))
    assert len(ds.train_x) == 2 * ds.num_classes
    assert not (tmp_path / "oxford_pets" / "split_fewshot").exists() and not (tmp_path / "cache").exists()


def test_built_split_saved_to_cache_dir_when_root_read_only(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_layout("DescribableTextures", data, raw=True)
    _deny_writes_under(monkeypatch, data)
    first = build_dataset(_cfg(data, name="DescribableTextures", seed=5))
    saved = tmp_path / "cache" / "splits" / "dtd" / "split_zhou_DescribableTextures.json"
    assert saved.is_file() and not (data / "dtd" / "split_zhou_DescribableTextures.json").exists()
    again = build_dataset(_cfg(data, name="DescribableTextures", seed=6))  # reads the saved split, not a new one
    assert (again.train_x, again.val, again.test) == (first.train_x, first.val, first.test)
