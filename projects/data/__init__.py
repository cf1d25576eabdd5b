"""Data: the built-in synthetic `shapes` data sets, checked COCO registration, mapper.

Importing this package registers ``shapes_train`` (600 images, seed 0) and ``shapes_val``
(100 images, seed 1), 128 px, in Detectron2's catalogs without generating anything; see
:func:`prepare_datasets` and docs/data.md.
"""
from .builtin import datasets_root, prepare_datasets, register_builtin_shapes, register_shapes
from .coco import CocoFormatError, load_coco_checked, register_coco_dataset
from .mapper import D2SegDatasetMapper, ImageReadError
from .shapes import SHAPES_CLASSES, generate_shapes, render_image

register_builtin_shapes()

__all__ = [
    "SHAPES_CLASSES",
    "CocoFormatError",
    "D2SegDatasetMapper",
    "ImageReadError",
    "datasets_root",
    "generate_shapes",
    "load_coco_checked",
    "prepare_datasets",
    "register_builtin_shapes",
    "register_coco_dataset",
    "register_shapes",
    "render_image",
]
