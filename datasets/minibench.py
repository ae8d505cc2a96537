"""MiniBench: procedural 32×32 miniatures of the CoOp protocols, generated offline by ``vltune.data.minibench``
(see its docstring for what each dataset draws and the class order). No paper; they stand in for real datasets so
that tests and CI can run every protocol without downloads.
"""

from __future__ import annotations

from vltune.data import CoOpDataset
from vltune.registry import DATASETS

GENERATE = "generate with: python -m vltune.data.minibench --root DATA"


@DATASETS.register()
class MiniShapes(CoOpDataset):
    """10 grey outlines (circle ... crescent) on dark noise; a generic object dataset like Caltech101."""

    dataset_dir = "mini_shapes"
    image_dir = "images"
    split_file = "split_zhou_MiniShapes.json"
    template = "a drawing of a {}."
    layout = f"mini_shapes/  images/<class>/, split_zhou_MiniShapes.json ({GENERATE})"


@DATASETS.register()
class MiniTextures(CoOpDataset):
    """10 full-frame colour patterns (stripes, checkerboard, polka dots, ...); plays DescribableTextures."""

    dataset_dir = "mini_textures"
    image_dir = "images"
    split_file = "split_zhou_MiniTextures.json"
    template = "{} texture."
    layout = f"mini_textures/  images/<class>/, split_zhou_MiniTextures.json ({GENERATE})"


@DATASETS.register()
class MiniObjects(CoOpDataset):
    """12 colour × shape compositions ("red circle" ...) on light noise; a fine-grained dataset like OxfordPets."""

    dataset_dir = "mini_objects"
    image_dir = "images"
    split_file = "split_zhou_MiniObjects.json"
    template = "a photo of a {}."
    layout = f"mini_objects/  images/<class>/, split_zhou_MiniObjects.json ({GENERATE})"


@DATASETS.register()
class MiniUnion(CoOpDataset):
    """42 classes: fresh shapes, textures and objects plus the ten digits; plays ImageNet (cross-dataset source)."""

    dataset_dir = "mini_union"
    image_dir = "images"
    split_file = "split_zhou_MiniUnion.json"
    template = "a photo of a {}."
    layout = f"mini_union/  images/<class>/, split_zhou_MiniUnion.json ({GENERATE})"


@DATASETS.register()
class MiniUnionV2(CoOpDataset):
    """MiniUnion's 42 classes, a new test sample with no shift; plays ImageNetV2."""

    dataset_dir = "mini_union_v2"
    image_dir = "images"
    split_file = "split_zhou_MiniUnionV2.json"
    template = "a photo of a {}."
    layout = f"mini_union_v2/  images/<class>/, split_zhou_MiniUnionV2.json ({GENERATE})"
    test_only = True


@DATASETS.register()
class MiniUnionSketch(CoOpDataset):
    """MiniUnion's 42 classes as edge maps (dark strokes on white); plays ImageNet-Sketch."""

    dataset_dir = "mini_union_sketch"
    image_dir = "images"
    split_file = "split_zhou_MiniUnionSketch.json"
    template = "a sketch of a {}."
    layout = f"mini_union_sketch/  images/<class>/, split_zhou_MiniUnionSketch.json ({GENERATE})"
    test_only = True


@DATASETS.register()
class MiniUnionNoise(CoOpDataset):
    """MiniUnion's 42 classes under an occluding patch and heavy noise, the hardest variant; plays ImageNet-A."""

    dataset_dir = "mini_union_noise"
    image_dir = "images"
    split_file = "split_zhou_MiniUnionNoise.json"
    template = "a photo of a {}."
    layout = f"mini_union_noise/  images/<class>/, split_zhou_MiniUnionNoise.json ({GENERATE})"
    test_only = True


@DATASETS.register()
class MiniUnionInverted(CoOpDataset):
    """MiniUnion's 42 classes with brightness inverted and hue kept, another rendition; plays ImageNet-R."""

    dataset_dir = "mini_union_inverted"
    image_dir = "images"
    split_file = "split_zhou_MiniUnionInverted.json"
    template = "a photo of a {}."
    layout = f"mini_union_inverted/  images/<class>/, split_zhou_MiniUnionInverted.json ({GENERATE})"
    test_only = True
