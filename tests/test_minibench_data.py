"""MiniBench (``vltune.data.minibench``) on really generated files: byte-identical regeneration, every dataset through
``build_dataset``, where MiniUnion's images come from, the domain shifts, and a pixel-classifier learnability check.
Run with ``-s`` to see the generation time and the accuracies.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vltune.config.defaults import get_cfg_default
from vltune.data import build_dataset, mini_render
from vltune.data.minibench import DATASETS, main, write_dataset, write_minibench

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "datasets"
SHAPES = ["circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "ring", "arrow", "crescent"]
TEXTURES = ["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots", "grid",
            "zigzag", "waves", "concentric rings", "speckle"]  # fmt: skip
OBJECTS = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# First half of each family, then the second half: base-to-new's base classes hold half of every family.
UNION = SHAPES[:5] + TEXTURES[:5] + OBJECTS[:6] + DIGITS[:5] + SHAPES[5:] + TEXTURES[5:] + OBJECTS[6:] + DIGITS[5:]
EXPECTED = {
    "MiniShapes": (SHAPES, "a drawing of a {}."),
    "MiniTextures": (TEXTURES, "{} texture."),
    "MiniObjects": (OBJECTS, "a photo of a {}."),
    "MiniUnion": (UNION, "a photo of a {}."),
    "MiniUnionV2": (UNION, "a photo of a {}."),
    "MiniUnionSketch": (UNION, "a sketch of a {}."),
    "MiniUnionNoise": (UNION, "a photo of a {}."),
    "MiniUnionInverted": (UNION, "a photo of a {}."),
}
VARIANTS = ["MiniUnionV2", "MiniUnionSketch", "MiniUnionNoise", "MiniUnionInverted"]
pytestmark = pytest.mark.slow  # generates MiniBench (twice for the byte-identity check), trains a pixel classifier


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("minibench"))
    start = time.perf_counter()
    folders = write_minibench(path)
    print(f"\nMiniBench generation (8 datasets + Digits): {time.perf_counter() - start:.1f} s")
    assert folders == {"Digits": os.path.join(path, "digits")} | {
        n: os.path.join(path, DATASETS[n][0]) for n in EXPECTED
    }
    return path


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "cache"))


def _build(root: str, name: str, subsample: str = "all"):
    cfg = get_cfg_default()
    cfg.merge_from_file(str(CONFIGS / f"{DATASETS[name][0]}.yaml"))
    cfg.DATASET.ROOT, cfg.SEED, cfg.DATASET.SUBSAMPLE_CLASSES = root, 1, subsample
    return build_dataset(cfg)


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _hashes(folder: str) -> dict[str, str]:
    """relative path → sha256 of every file under ``folder``."""
    return {
        os.path.relpath(os.path.join(d, f), folder): _sha(os.path.join(d, f))
        for d, _, fs in os.walk(folder)
        for f in fs
    }


def _pixels(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32)


def _by_class(items) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for d in items:
        out.setdefault(d.classname, []).append(d.impath)
    return out


# ------------------------------------------------------------------ generation
def test_regeneration_is_byte_identical(root, tmp_path):
    start = time.perf_counter()
    write_minibench(str(tmp_path / "again"))
    print(f"\nMiniBench regeneration: {time.perf_counter() - start:.1f} s")
    first, second = _hashes(root), _hashes(str(tmp_path / "again"))
    assert len(first) == 1797 + (10 + 10 + 12 + 42) * 90 + 4 * 42 * 30 + 9  # images + 9 split files
    assert first == second


def test_seed_changes_procedural_images(root, tmp_path):
    other = str(tmp_path / "seed1")
    write_dataset(other, "MiniShapes", seed=1)
    base, changed = _hashes(os.path.join(root, "mini_shapes")), _hashes(os.path.join(other, "mini_shapes"))
    assert base.keys() == changed.keys()
    images = [k for k in base if k.endswith(".png")]
    assert len(images) == 10 * 90 and all(base[k] != changed[k] for k in images)
    assert base["split_zhou_MiniShapes.json"] == changed["split_zhou_MiniShapes.json"]  # same names, labels


def test_existing_split_is_skipped_and_half_written_folder_regenerated(root, tmp_path):
    folder = write_dataset(str(tmp_path), "MiniShapes")
    expected = _hashes(folder)
    image = os.path.join(folder, "images", "star", "0003.png")
    Image.new("RGB", (32, 32)).save(image)
    write_dataset(str(tmp_path), "MiniShapes")  # split JSON present: nothing is rewritten
    assert _hashes(folder)["images/star/0003.png"] != expected["images/star/0003.png"]
    os.remove(os.path.join(folder, "split_zhou_MiniShapes.json"))  # as if killed before the JSON was written
    write_dataset(str(tmp_path), "MiniShapes")
    assert _hashes(folder) == expected


def test_cli_prints_folders(root, capsys):
    main(["--root", root])  # everything exists already: returns at once
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Digits: {os.path.join(root, 'digits')}"
    assert lines[1:] == [f"{n}: {os.path.join(root, DATASETS[n][0])}" for n in EXPECTED]


# ------------------------------------------------------------------ datasets
@pytest.mark.parametrize("name", list(EXPECTED))
def test_dataset_builds(root, name):
    with open(CONFIGS / f"{DATASETS[name][0]}.yaml") as f:
        assert yaml.safe_load(f) == {"DATASET": {"NAME": name}}
    classes, template = EXPECTED[name]
    ds = _build(root, name)
    assert type(ds).template == template and ds.classnames == classes and ds.num_classes == len(classes)
    assert ds.lab2cname == dict(enumerate(classes))
    per_split = {"train": ds.train_x, "val": ds.val, "test": ds.test}
    counts = {"test": 30} if name in VARIANTS else {"train": 50, "val": 10, "test": 30}
    if name in VARIANTS:
        assert ds.test_only and ds.train_x == ds.test and ds.val == []
        with open(os.path.join(root, DATASETS[name][0], f"split_zhou_{name}.json")) as f:
            raw = json.load(f)
        assert raw["train"] == [] and raw["val"] == []
    for key, n in counts.items():
        assert sorted(d.label for d in per_split[key]) == [y for y in range(len(classes)) for _ in range(n)], key
        for d in per_split[key]:
            assert d.classname == classes[d.label]
            assert os.path.dirname(d.impath) == os.path.join(ds.image_path, d.classname.replace(" ", "_"))


@pytest.mark.parametrize(("name", "half"), [("MiniShapes", 5), ("MiniUnion", 21)])
def test_base_new_halves(root, name, half):
    base, new = _build(root, name, "base"), _build(root, name, "new")
    assert base.classnames == EXPECTED[name][0][:half] and new.classnames == EXPECTED[name][0][half:]
    assert len(base.train_x) == 50 * half and len(new.test) == 30 * (len(EXPECTED[name][0]) - half)


def test_missing_folder_says_how_to_generate(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m vltune\.data\.minibench --root DATA"):
        _build(str(tmp_path), "MiniUnionSketch")


def test_images_are_32px_rgb(root):
    n = 0
    for name in [*EXPECTED, "Digits"]:
        for dirpath, _, files in os.walk(os.path.join(root, DATASETS.get(name, ("digits",))[0], "images")):
            for f in files:
                with Image.open(os.path.join(dirpath, f)) as im:
                    assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32)), (dirpath, f)
                n += 1
    assert n == 1797 + (10 + 10 + 12 + 42) * 90 + 4 * 42 * 30


# ------------------------------------------------------------------ provenance
def test_union_procedural_images_are_fresh(root):
    components = set()
    for name in ("MiniShapes", "MiniTextures", "MiniObjects"):
        components |= set(_hashes(os.path.join(root, DATASETS[name][0], "images")).values())
    union = _build(root, "MiniUnion")
    procedural = [d.impath for d in union.train_x + union.val + union.test if d.classname not in DIGITS]
    assert len(procedural) == 32 * 90
    assert not {_sha(p) for p in procedural} & components


def test_digit_images_come_from_the_digits_splits(root):
    cfg = get_cfg_default()
    cfg.DATASET.NAME, cfg.DATASET.ROOT, cfg.SEED = "Digits", root, 1
    digits = build_dataset(cfg)
    union = _build(root, "MiniUnion")
    for key, count in (("train_x", 50), ("val", 10), ("test", 30)):
        source, copied = _by_class(getattr(digits, key)), _by_class(getattr(union, key))
        for name in DIGITS:
            assert [_sha(p) for p in copied[name]] == [_sha(p) for p in source[name][:count]], (key, name)
    source = _by_class(digits.test)
    shifts = {
        "MiniUnionV2": lambda a: a,
        "MiniUnionSketch": mini_render.sketch,
        "MiniUnionInverted": mini_render.luminance_inverted,
    }
    for variant, shift in shifts.items():
        shifted = _by_class(_build(root, variant).test)
        for name in DIGITS:
            for src, dst in zip(source[name][-30:], shifted[name], strict=True):
                expected = shift(np.asarray(Image.open(src).convert("RGB")))
                assert np.array_equal(np.asarray(Image.open(dst)), expected), (variant, name)


def test_variants_are_shifted(root):
    v2 = _by_class(_build(root, "MiniUnionV2").test)
    sketch = _by_class(_build(root, "MiniUnionSketch").test)
    noise = _by_class(_build(root, "MiniUnionNoise").test)
    inverted = _by_class(_build(root, "MiniUnionInverted").test)
    union = set(_hashes(os.path.join(root, "mini_union", "images")).values())
    for variant in (v2, sketch, noise, inverted):  # fresh draws (digits: see the test above)
        assert not {_sha(p) for c, paths in variant.items() if c not in DIGITS for p in paths} & union
    for name in UNION:
        clean = np.stack([_pixels(p) for p in v2[name]])
        edges = np.stack([_pixels(p) for p in sketch[name]])
        assert (edges == edges[..., :1]).all(), name  # grey
        assert edges.min() <= 100 and edges.max() >= 200, name  # dark strokes on a light page
        assert name in TEXTURES or (edges >= 160).mean() >= 0.25, name  # mostly light (textures: strokes everywhere)
        noisy = np.stack([_pixels(p) for p in noise[name]])
        roughness = lambda x: np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean()  # noqa: E731
        assert roughness(noisy) > 1.4 * roughness(clean), name  # speckle, already rough, is the closest (1.7×)
        light = np.stack([_pixels(p) for p in inverted[name]]).mean()
        if name in SHAPES + DIGITS:  # light on dark → dark on light
            assert light > clean.mean() + 60, name
        elif name in OBJECTS:  # on a light background → on a dark one
            assert light < clean.mean() - 60, name


def test_downstream_shapes_and_objects_are_another_rendition_than_the_unions(root):
    """MiniShapes: dark shapes on a light ground (MiniUnion: light on dark); MiniObjects: on a dark ground (MiniUnion:
    light). The mini CLIP pretrains on MiniUnion only, so these two meet it as a new domain."""
    def corners(paths: list[str]) -> float:  # the ground: shapes never reach the image corners
        return float(np.stack([_pixels(p) for p in paths])[:, [0, 0, -1, -1], [0, -1, 0, -1]].mean())

    union = _by_class(_build(root, "MiniUnion").train_x)
    for dataset, classes, brighter in (("MiniShapes", SHAPES, True), ("MiniObjects", OBJECTS, False)):
        own = _by_class(_build(root, dataset).train_x)
        for name in classes:
            ground, union_ground = corners(own[name]), corners(union[name])
            assert (ground > union_ground + 80) if brighter else (ground < union_ground - 80), (dataset, name)


# ------------------------------------------------------------------ learnability
def _features(items) -> tuple[np.ndarray, np.ndarray]:
    """8×8 average-pooled RGB pixels + the pooled log amplitude spectrum of the grey image.

    The spectrum is the one non-pixel feature: it ignores phase, and textures have a random phase, which no linear
    model on raw pixels can ignore (raw pixels leave MiniTextures near chance).
    """
    images = np.stack([np.asarray(Image.open(d.impath), dtype=np.float32) / 255 for d in items])  # (N, 32, 32, 3)
    pixels = images.reshape(-1, 8, 4, 8, 4, 3).mean(axis=(2, 4)).reshape(len(images), -1)
    gray = images.mean(axis=3)
    spectrum = np.log1p(np.abs(np.fft.rfft2(gray - gray.mean(axis=(1, 2), keepdims=True))))  # (N, 32, 17)
    spectrum = spectrum.reshape(-1, 16, 2, 17).mean(axis=2).reshape(len(images), -1)
    return np.concatenate([pixels, spectrum], axis=1), np.array([d.label for d in items])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 100 iterations are plenty here
def test_classes_are_learnable_from_pixels(root):
    accuracies = {}
    for name in ("MiniShapes", "MiniTextures", "MiniObjects", "MiniUnion"):
        ds = _build(root, name)
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=100))
        classifier.fit(*_features(ds.train_x))
        accuracies[name] = classifier.score(*_features(ds.test))
        assert accuracies[name] >= 2 / ds.num_classes, (name, accuracies[name])
    for variant in VARIANTS:  # the MiniUnion classifier on the shifted test sets
        accuracies[f"MiniUnion → {variant}"] = classifier.score(*_features(_build(root, variant).test))
    print("\nlogistic regression (8×8 pixels + amplitude spectrum), test accuracy:")
    for name, accuracy in accuracies.items():
        print(f"  {name:32s} {100 * accuracy:5.1f} %")
    assert accuracies["MiniUnion → MiniUnionV2"] >= accuracies["MiniUnion"] - 0.1  # same distribution
    for variant in VARIANTS[1:]:  # a real shift: far below the unshifted sample
        assert accuracies[f"MiniUnion → {variant}"] <= accuracies["MiniUnion → MiniUnionV2"] - 0.2, variant
