"""Data: the built-in synthetic `shapes` data sets, checked COCO registration and its
evaluator, mapper, image reading (8 bits).

Importing this package registers ``shapes_train`` (600 images, seed 0) and ``shapes_val``
(100 images, seed 1), 128 px, and their semantic forms ``shapes_sem_seg_train`` /
``shapes_sem_seg_val``, in Detectron2's catalogs without generating anything; see
:func:`prepare_datasets` and docs/data.md.
"""
from .builtin import (
    datasets_root,
    prepare_datasets,
    register_builtin_shapes,
    register_shapes,
    register_shapes_sem_seg,
)
from .coco import CheckedRecords, CocoFormatError, LoadSummary, load_coco_checked, register_coco_dataset
from .evaluation import CheckedCOCOEvaluator
from .mapper import D2SegDatasetMapper, ImageReadError, read_image_8bit
from .shapes import (
    SEM_SEG_CLASSES,
    SHAPES_CLASSES,
    generate_shapes,
    generate_shapes_sem_seg,
    render_image,
    render_semantic_labels,
)

register_builtin_shapes()

__all__ = [
    "SEM_SEG_CLASSES",
    "SHAPES_CLASSES",
    "CheckedCOCOEvaluator",
    "CheckedRecords",
    "CocoFormatError",
    "D2SegDatasetMapper",
    "ImageReadError",
    "LoadSummary",
    "datasets_root",
    "generate_shapes",
    "generate_shapes_sem_seg",
    "load_coco_checked",
    "prepare_datasets",
    "read_image_8bit",
    "register_builtin_shapes",
    "register_coco_dataset",
    "register_shapes",
    "register_shapes_sem_seg",
    "render_image",
    "render_semantic_labels",
]
