"""Miniature copies of the 15 CoOp datasets in their real folder layout, for tests.

``make_layout(name, root)`` writes ``root/<dataset_dir>/`` with 8x8 images (extensions as in the real data), the real
split JSON (``raw=False``) or only the raw annotation files a split is rebuilt from (``raw=True``; ``.mat`` files via
scipy), 3-5 classes and a few images per class. It returns what a correct loader must produce. A registered dataset
with no builder here but a split JSON (e.g. a future ``Digits``) gets a generic JSON layout from its class attributes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class Layout:
    """Expected result of loading a miniature dataset (all classes, no few-shot)."""

    name: str
    dataset_dir: str
    classnames: list[str]  # by label
    n_train: int
    n_val: int
    n_test: int


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), ((seed * 37) % 256, (seed * 91) % 256, 128)).save(path)  # format from the extension


def write_text(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def write_split(path: Path, split: dict[str, list[tuple[str, int, str]]]) -> None:
    """A split JSON exactly as Dassl writes it."""
    with open(path, "w") as f:
        json.dump(
            {k: [list(e) for e in split[k]] for k in ("train", "val", "test")}, f, indent=4, separators=(",", ": ")
        )


def json_layout(
    root: Path,
    name: str,
    dataset_dir: str,
    image_dir: str,
    split_file: str,
    classes: list[tuple[str, str]],
    relpath: Callable[[str, int, str], str],
    counts: tuple[int, int, int] = (4, 2, 3),
) -> Layout:
    """Images + split JSON; ``classes`` = (folder/stem, classname) by label, ``relpath(folder, i, split)``."""
    img_root = root / dataset_dir / image_dir
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    n = 0
    for label, (folder, cname) in enumerate(classes):
        for key, count in zip(split, counts):
            for _ in range(count):
                n += 1
                rel = relpath(folder, n, key)
                write_image(img_root / rel, n)
                split[key].append((rel, label, cname))
    write_split(root / dataset_dir / split_file, split)
    return Layout(name, dataset_dir, [c for _, c in classes], *(len(classes) * c for c in counts))


def folders_layout(
    root: Path,
    name: str,
    dataset_dir: str,
    image_dir: str,
    folders: list[str],
    expected: list[str],
    ext: str = ".jpg",
    per_class: int = 5,
) -> Layout:
    """Raw class folders for ``read_and_split_data`` (5 images: 2 train, 1 val, 2 test per class)."""
    for i, folder in enumerate(folders):
        for j in range(per_class):
            write_image(root / dataset_dir / image_dir / folder / f"{folder}_{j + 1:04d}{ext}", i * 10 + j)
    k = len(expected)
    return Layout(name, dataset_dir, expected, 2 * k, k, 2 * k)


# -------------------------------------------------------------------- datasets
PETS = [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"), ("Bengal", "bengal")]


def oxford_pets(root: Path, raw: bool) -> Layout:
    if not raw:
        return json_layout(
            root,
            "OxfordPets",
            "oxford_pets",
            "images",
            "split_zhou_OxfordPets.json",
            PETS,
            lambda stem, i, _: f"{stem}_{i}.jpg",
        )
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for cid, (stem, _) in enumerate(PETS, start=1):
        for j in range(7):  # 5 trainval (→ 4 train, 1 val) + 2 test
            write_image(root / "oxford_pets" / "images" / f"{stem}_{j + 1}.jpg", cid * 10 + j)
            lines["trainval" if j < 5 else "test"].append(f"{stem}_{j + 1} {cid} {1 + cid % 2} {j + 1}")
    for key, value in lines.items():
        write_text(root / "oxford_pets" / "annotations" / f"{key}.txt", value)
    return Layout("OxfordPets", "oxford_pets", [c for _, c in PETS], 12, 3, 6)


CALTECH = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes"]
CALTECH_NAMES = ["face", "leopard", "motorbike", "accordion", "airplane"]


def caltech101(root: Path, raw: bool) -> Layout:
    if raw:
        return folders_layout(root, "Caltech101", "caltech-101", "101_ObjectCategories", CALTECH, CALTECH_NAMES)
    classes = list(zip(CALTECH[1:2] + CALTECH[3:], CALTECH_NAMES))
    return json_layout(
        root,
        "Caltech101",
        "caltech-101",
        "101_ObjectCategories",
        "split_zhou_Caltech101.json",
        classes,
        lambda folder, i, _: f"{folder}/image_{i:04d}.jpg",
    )


CARS = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Tesla Model S Sedan 2012"]
CARS_NAMES = ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 Tesla Model S Sedan"]


def stanford_cars(root: Path, raw: bool) -> Layout:
    if not raw:
        return json_layout(
            root,
            "StanfordCars",
            "stanford_cars",
            "",
            "split_zhou_StanfordCars.json",
            list(zip(CARS, CARS_NAMES)),
            lambda _, i, key: f"cars_{'test' if key == 'test' else 'train'}/{i:05d}.jpg",
        )
    import numpy as np
    from scipy.io import savemat

    def annos(folder: str, per_class: int) -> np.ndarray:
        rows = [(f"{label * per_class + j + 1:05d}.jpg", label + 1) for label in range(3) for j in range(per_class)]
        arr = np.zeros((1, len(rows)), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
        for k, (fname, cls) in enumerate(rows):
            arr[0, k] = (np.array([[1]]), np.array([[cls]], dtype=np.uint8), np.array([fname]))
            write_image(root / "stanford_cars" / folder / fname, k)
        return arr

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS], dtype=object)})
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos("cars_train", 5)})
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos("cars_test", 2)})
    return Layout("StanfordCars", "stanford_cars", CARS_NAMES, 12, 3, 6)


FLOWERS = {"1": "pink primrose", "2": "hard-leaved pocket orchid", "3": "canterbury bells"}


def oxford_flowers(root: Path, raw: bool) -> Layout:
    base = root / "oxford_flowers"
    base.mkdir(parents=True)
    (base / "cat_to_name.json").write_text(json.dumps(FLOWERS, indent=4))
    if not raw:
        return json_layout(
            root,
            "OxfordFlowers",
            "oxford_flowers",
            "jpg",
            "split_zhou_OxfordFlowers.json",
            [(k, v) for k, v in FLOWERS.items()],
            lambda _, i, __: f"image_{i:05d}.jpg",
        )
    import numpy as np
    from scipy.io import savemat

    labels = [3, 1, 2] * 5  # interleaved; first appearance 3, 1, 2
    for i in range(len(labels)):
        write_image(base / "jpg" / f"image_{i + 1:05d}.jpg", i)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    return Layout("OxfordFlowers", "oxford_flowers", list(FLOWERS.values()), 6, 3, 6)


FOOD = ["apple_pie", "baby_back_ribs", "baklava"]


def food101(root: Path, raw: bool) -> Layout:
    (root / "food-101" / "meta").mkdir(parents=True)
    if raw:
        return folders_layout(root, "Food101", "food-101", "images", FOOD, FOOD)
    return json_layout(
        root,
        "Food101",
        "food-101",
        "images",
        "split_zhou_Food101.json",
        [(f, f) for f in FOOD],
        lambda folder, i, _: f"{folder}/{1000000 + i}.jpg",
    )


AIRCRAFT = ["707-320", "A300B4", "Cessna 172", "F/A-18"]


def fgvc_aircraft(root: Path, raw: bool) -> Layout:
    base = root / "fgvc_aircraft"
    write_text(base / "variants.txt", AIRCRAFT)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    n = 0
    for variant in AIRCRAFT:
        for key, count in (("train", 3), ("val", 2), ("test", 2)):
            for _ in range(count):
                n += 1
                write_image(base / "images" / f"{1000000 + n:07d}.jpg", n)
                lines[key].append(f"{1000000 + n:07d} {variant}")
    for key, value in lines.items():
        write_text(base / f"images_variant_{key}.txt", value)
    return Layout("FGVCAircraft", "fgvc_aircraft", AIRCRAFT, 12, 8, 8)


SUN = ["a/abbey", "a/apartment_building/outdoor", "b/balcony/interior"]
SUN_NAMES = ["abbey", "outdoor apartment_building", "interior balcony"]


def sun397(root: Path, raw: bool) -> Layout:
    if not raw:
        return json_layout(
            root,
            "SUN397",
            "sun397",
            "SUN397",
            "split_zhou_SUN397.json",
            list(zip(SUN, SUN_NAMES)),
            lambda folder, i, _: f"{folder}/sun_{i:04d}.jpg",
        )
    base = root / "sun397"
    write_text(base / "ClassName.txt", ["/" + c for c in SUN])
    lines: dict[str, list[str]] = {"Training_01.txt": [], "Testing_01.txt": []}
    for c in SUN:
        for j in range(7):
            write_image(base / "SUN397" / c / f"sun_{j:04d}.jpg", j)
            lines["Training_01.txt" if j < 5 else "Testing_01.txt"].append(f"/{c}/sun_{j:04d}.jpg")
    for key, value in lines.items():
        write_text(base / key, value)
    return Layout("SUN397", "sun397", SUN_NAMES, 12, 3, 6)


DTD = ["banded", "blotchy", "braided"]


def dtd(root: Path, raw: bool) -> Layout:
    for sub in ("imdb", "labels"):
        (root / "dtd" / sub).mkdir(parents=True)
    if raw:
        return folders_layout(root, "DescribableTextures", "dtd", "images", DTD, DTD)
    return json_layout(
        root,
        "DescribableTextures",
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        [(f, f) for f in DTD],
        lambda folder, i, _: f"{folder}/{folder}_{i:04d}.jpg",
    )


EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "SeaLake"]
EUROSAT_NAMES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Sea or Lake"]


def eurosat(root: Path, raw: bool) -> Layout:
    if raw:
        return folders_layout(root, "EuroSAT", "eurosat", "2750", EUROSAT, EUROSAT_NAMES)
    return json_layout(
        root,
        "EuroSAT",
        "eurosat",
        "2750",
        "split_zhou_EuroSAT.json",
        list(zip(EUROSAT, EUROSAT_NAMES)),
        lambda folder, i, _: f"{folder}/{folder}_{i}.jpg",
    )


UCF = ["ApplyEyeMakeup", "BandMarching", "YoYo"]
UCF_NAMES = ["Apply_Eye_Makeup", "Band_Marching", "Yo_Yo"]


def ucf101(root: Path, raw: bool) -> Layout:
    if not raw:
        return json_layout(
            root,
            "UCF101",
            "ucf101",
            "UCF-101-midframes",
            "split_zhou_UCF101.json",
            list(zip(UCF_NAMES, UCF_NAMES)),
            lambda folder, i, _: f"{folder}/v_{folder.replace('_', '')}_g{i:02d}_c01.jpg",
        )
    base = root / "ucf101"
    write_text(base / "ucfTrainTestlist" / "classInd.txt", [f"{i + 1} {a}" for i, a in enumerate(UCF)])
    lines: dict[str, list[str]] = {"trainlist01.txt": [], "testlist01.txt": []}
    for i, (action, folder) in enumerate(zip(UCF, UCF_NAMES)):
        for g in range(7):
            write_image(base / "UCF-101-midframes" / folder / f"v_{action}_g{g + 8:02d}_c01.jpg", g)
            entry = f"{action}/v_{action}_g{g + 8:02d}_c01.avi"
            if g < 5:
                lines["trainlist01.txt"].append(f"{entry} {i + 1}")
            else:
                lines["testlist01.txt"].append(entry)
    for key, value in lines.items():
        write_text(base / "ucfTrainTestlist" / key, value)
    return Layout("UCF101", "ucf101", UCF_NAMES, 12, 3, 6)


WNIDS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
}


def _classnames(base: Path, wnids: list[str]) -> None:
    write_text(base / "classnames.txt", [f"{w} {WNIDS[w]}" for w in wnids])


def imagenet(root: Path, raw: bool) -> Layout:
    base, wnids = root / "imagenet", list(WNIDS)[:3]
    _classnames(base, wnids)
    for i, w in reversed(list(enumerate(wnids))):  # creation order must not matter
        for j in range(4):
            write_image(base / "images" / "train" / w / f"{w}_{j + 1}.JPEG", j)
        for j in range(2):
            write_image(base / "images" / "val" / w / f"ILSVRC2012_val_{2 * i + j + 1:08d}.JPEG", j)
    return Layout("ImageNet", "imagenet", [WNIDS[w] for w in wnids], 12, 6, 6)


def _variant(root: Path, name: str, dataset_dir: str, image_dir: str, present: list[str], readme: bool) -> Layout:
    base = root / dataset_dir
    _classnames(base, list(WNIDS))  # the full list; only `present` have folders
    for i, w in enumerate(present):
        for j in range(2):
            write_image(base / image_dir / w / f"{i}_{j}.jpg", j)
    if readme:
        write_text(base / image_dir / "README.txt", ["not a class"])
    return Layout(name, dataset_dir, [WNIDS[w] for w in sorted(present)], 2 * len(present), 0, 2 * len(present))


def imagenetv2(root: Path, raw: bool) -> Layout:
    base = root / "imagenetv2"
    _classnames(base, list(WNIDS))
    for label in range(len(WNIDS)):
        for j in range(2):
            write_image(base / "imagenetv2-matched-frequency-format-val" / str(label) / f"{label:x}{j}abc.jpeg", j)
    return Layout("ImageNetV2", "imagenetv2", list(WNIDS.values()), 10, 0, 10)


LAYOUTS: dict[str, Callable[[Path, bool], Layout]] = {
    "ImageNet": imagenet,
    "Caltech101": caltech101,
    "OxfordPets": oxford_pets,
    "StanfordCars": stanford_cars,
    "OxfordFlowers": oxford_flowers,
    "Food101": food101,
    "FGVCAircraft": fgvc_aircraft,
    "SUN397": sun397,
    "DescribableTextures": dtd,
    "EuroSAT": eurosat,
    "UCF101": ucf101,
    "ImageNetV2": imagenetv2,
    "ImageNetSketch": lambda root, raw: _variant(
        root, "ImageNetSketch", "imagenet-sketch", "images", list(WNIDS), readme=False
    ),
    "ImageNetA": lambda root, raw: _variant(
        root, "ImageNetA", "imagenet-adversarial", "imagenet-a", ["n01494475", "n01443537", "n01491361"], readme=True
    ),
    "ImageNetR": lambda root, raw: _variant(
        root, "ImageNetR", "imagenet-rendition", "imagenet-r", ["n01484850", "n01440764"], readme=True
    ),
}
# Datasets whose split can also be rebuilt from raw annotations (their JSON form is the default).
RAW_BUILDERS = (
    "Caltech101",
    "OxfordPets",
    "StanfordCars",
    "OxfordFlowers",
    "Food101",
    "SUN397",
    "DescribableTextures",
    "EuroSAT",
    "UCF101",
)
YAML = {
    "ImageNet": "imagenet",
    "Caltech101": "caltech101",
    "OxfordPets": "oxford_pets",
    "StanfordCars": "stanford_cars",
    "OxfordFlowers": "oxford_flowers",
    "Food101": "food101",
    "FGVCAircraft": "fgvc_aircraft",
    "SUN397": "sun397",
    "DescribableTextures": "dtd",
    "EuroSAT": "eurosat",
    "UCF101": "ucf101",
    "ImageNetV2": "imagenetv2",
    "ImageNetSketch": "imagenet_sketch",
    "ImageNetA": "imagenet_a",
    "ImageNetR": "imagenet_r",
}


def yaml_name(name: str) -> str:
    """Dataset yaml stem: the table above, else the snake_case of the name (``Digits`` → ``digits``)."""
    return YAML.get(name) or re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def make_layout(name: str, root: Path, raw: bool = False) -> Layout:
    """Write the miniature ``name`` under ``root``; a JSON-only dataset without a builder gets a generic layout."""
    if name in LAYOUTS:
        return LAYOUTS[name](Path(root), raw)
    from vltune.registry import DATASETS

    cls = DATASETS.get(name)
    if not getattr(cls, "split_file", ""):
        raise NotImplementedError(f"add a miniature layout for {name} to tests/layouts.py")
    classes = [(f"class_{c}", f"class {c}") for c in "abc"]
    return json_layout(
        Path(root),
        name,
        cls.dataset_dir,
        cls.image_dir,
        cls.split_file,
        classes,
        lambda folder, i, _: os.path.join(folder, f"{i:05d}.png"),
    )
