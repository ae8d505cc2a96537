"""MiniBench: procedural 32×32 miniatures of the CoOp protocols, generated offline by ``vltune.data.minibench``
(see its docstring for what each dataset draws and the class order). No paper; they stand in for real datasets so
that tests and CI can run every protocol without downloads.
"""

from __future__ import annotations

from vltune.data import CoOpDataset
from vltune.registry import DATASETS


class MiniBenchDataset(CoOpDataset):
    """Shared layout: ``<dataset_dir>/images/<class>/`` and ``split_zhou_<ClassName>.json``, with the generate hint."""

    image_dir = "images"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.split_file = f"split_zhou_{cls.__name__}.json"
        cls.layout = (f"{cls.dataset_dir}/  images/<class>/, {cls.split_file} "
                      "(generate with: python -m vltune.data.minibench --root DATA)")


@DATASETS.register()
class MiniShapes(MiniBenchDataset):
    """10 grey outlines (circle ... crescent) on dark noise; a generic object dataset like Caltech101."""

    dataset_dir = "mini_shapes"
    template = "a drawing of a {}."


@DATASETS.register()
class MiniTextures(MiniBenchDataset):
    """10 full-frame colour patterns (stripes, checkerboard, polka dots, ...); plays DescribableTextures."""

    dataset_dir = "mini_textures"
    template = "{} texture."


@DATASETS.register()
class MiniObjects(MiniBenchDataset):
    """12 colour × shape compositions ("red circle" ...) on light noise; a fine-grained dataset like OxfordPets."""

    dataset_dir = "mini_objects"
    template = "a photo of a {}."


@DATASETS.register()
class MiniUnion(MiniBenchDataset):
    """42 classes: fresh shapes, textures and objects plus the ten digits; plays ImageNet (cross-dataset source)."""

    dataset_dir = "mini_union"
    template = "a photo of a {}."


@DATASETS.register()
class MiniUnionV2(MiniBenchDataset):
    """MiniUnion's 42 classes, a new test sample with no shift; plays ImageNetV2."""

    dataset_dir = "mini_union_v2"
    template = "a photo of a {}."
    test_only = True
    variant_of = "MiniUnion"


@DATASETS.register()
class MiniUnionSketch(MiniBenchDataset):
    """MiniUnion's 42 classes as pencil sketches (strokes on white over faint shading); plays ImageNet-Sketch."""

    dataset_dir = "mini_union_sketch"
    template = "a sketch of a {}."
    test_only = True
    variant_of = "MiniUnion"


@DATASETS.register()
class MiniUnionNoise(MiniBenchDataset):
    """MiniUnion's 42 classes under an occluding patch and heavy noise, the hardest variant; plays ImageNet-A."""

    dataset_dir = "mini_union_noise"
    template = "a photo of a {}."
    test_only = True
    variant_of = "MiniUnion"


@DATASETS.register()
class MiniUnionInverted(MiniBenchDataset):
    """MiniUnion's 42 classes with brightness inverted and hue kept, another rendition; plays ImageNet-R."""

    dataset_dir = "mini_union_inverted"
    template = "a photo of a {}."
    test_only = True
    variant_of = "MiniUnion"
