"""Registration of the built-in `shapes` data sets and their preparation from a config.

``shapes_train`` (600 images, seed 0) and ``shapes_val`` (100 images, seed 1) at 128 px
are registered when d2seg.data is imported; nothing is generated then. The files are
written under $DETECTRON2_DATASETS (default ``datasets``) the first time a data set is
loaded, or by :func:`prepare_datasets`, which the trainer calls with its config.
"""
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco import _replace_registration, load_coco_checked
from .shapes import SHAPES_CLASSES, datasets_root, generate_shapes, shapes_paths

logger = logging.getLogger(__name__)

# name -> (split, default number of images, seed offset from D2SEG.SHAPES.SEED)
BUILTIN_SHAPES = {
    "shapes_train": ("train", 600, 0),
    "shapes_val": ("val", 100, 1),
}
_DEFAULT_SIZE = 128
_DEFAULT_SEED = 0


def _load_shapes(name, split, num_images, image_size, seed, root):
    json_file, image_root = generate_shapes(split, num_images, image_size, seed, root)
    return load_coco_checked(json_file, image_root, name)


def register_shapes(name, split, num_images, image_size, seed, root=None):
    """Register a shapes data set under ``name``; its files are generated on first load.

    Metadata as Detectron2's register_coco_instances gives (json_file, image_root,
    evaluator_type="coco", thing_classes, thing_dataset_id_to_contiguous_id). Re-registering
    a name replaces its registration.

    Args:
        name (str): data set name.
        split (str): "train", "val", ... (part of the folder name only).
        num_images (int), image_size (int): number of images and their side in px.
        seed (int): random seed; the data set is a function of it.
        root (str or None): parent folder; None means :func:`datasets_root` now.

    Returns:
        (json_file, image_root) that the data set will have.
    """
    if int(num_images) < 1 or int(image_size) < 16:
        raise ValueError(
            f"shapes data set '{name}': need num_images >= 1 and image_size >= 16, "
            f"got {num_images} and {image_size}"
        )
    root = datasets_root() if root is None else os.fspath(root)
    _, json_file, image_root = shapes_paths(root, split, num_images, image_size, seed)
    _replace_registration(name, announce=False)
    DatasetCatalog.register(
        name, lambda: _load_shapes(name, split, num_images, image_size, seed, root)
    )
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=list(SHAPES_CLASSES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
        shapes_params=dict(split=split, num_images=int(num_images),
                           image_size=int(image_size), seed=int(seed), root=root),
    )
    return json_file, image_root


def register_builtin_shapes(root=None):
    """Register shapes_train / shapes_val with their default parameters (no files made)."""
    for name, (split, num, seed_offset) in BUILTIN_SHAPES.items():
        register_shapes(name, split, num, _DEFAULT_SIZE, _DEFAULT_SEED + seed_offset, root)


def prepare_datasets(cfg):
    """Re-register the built-in shapes data sets used by ``cfg`` with its D2SEG.SHAPES
    parameters and generate their files if missing.

    Call before building any data loader or evaluator (every distributed rank may call
    it; concurrent generation is safe). Other data set names are left alone.

    Returns:
        dict: name -> json_file for each shapes data set prepared.
    """
    sc = cfg.D2SEG.SHAPES
    prepared = {}
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in BUILTIN_SHAPES or name in prepared:
            continue
        split, _, seed_offset = BUILTIN_SHAPES[name]
        num = sc.NUM_TRAIN if split == "train" else sc.NUM_VAL
        seed = sc.SEED + seed_offset
        root = datasets_root()
        json_file, _ = register_shapes(name, split, num, sc.IMAGE_SIZE, seed, root)
        if os.path.isfile(json_file):
            logger.info(f"Using {name} from {os.path.dirname(json_file)}")
        else:
            generate_shapes(split, num, sc.IMAGE_SIZE, seed, root)
        prepared[name] = json_file
    return prepared
