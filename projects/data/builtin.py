"""Registration of the built-in `shapes` data sets and their preparation from a config.

``shapes_train`` (600 images, seed 0) and ``shapes_val`` (100 images, seed 1) at 128 px
(COCO instances), and their semantic forms ``shapes_sem_seg_train`` / ``shapes_sem_seg_val``
(same images, PNG label maps), are registered when d2seg.data is imported; nothing is
generated then. The files are
written under $DETECTRON2_DATASETS (default ``datasets``) the first time a data set is
loaded, or by :func:`prepare_datasets`, which the trainer calls with its config.
"""
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .coco import _replace_registration, load_coco_checked
from .shapes import (
    SEM_SEG_CLASSES,
    SEM_SEG_IGNORE,
    SHAPES_CLASSES,
    datasets_root,
    generate_shapes,
    generate_shapes_sem_seg,
    shapes_paths,
    shapes_sem_seg_paths,
)

logger = logging.getLogger(__name__)

# name -> (split, default number of images, seed offset from D2SEG.SHAPES.SEED)
BUILTIN_SHAPES = {
    "shapes_train": ("train", 600, 0),
    "shapes_val": ("val", 100, 1),
}
BUILTIN_SHAPES_SEM_SEG = {
    "shapes_sem_seg_train": ("train", 600, 0),
    "shapes_sem_seg_val": ("val", 100, 1),
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


def _load_shapes_sem_seg(split, num_images, image_size, seed, root):
    image_root, label_root = generate_shapes_sem_seg(split, num_images, image_size, seed, root)
    records = []
    for i in range(int(num_images)):
        records.append(
            {
                "file_name": os.path.join(image_root, f"{i:06d}.jpg"),
                "sem_seg_file_name": os.path.join(label_root, f"{i:06d}.png"),
                "height": int(image_size),
                "width": int(image_size),
                "image_id": i + 1,
            }
        )
    return records


def register_shapes_sem_seg(name, split, num_images, image_size, seed, root=None):
    """Register the semantic form of a shapes data set under ``name`` (files generated on
    first load): records with file_name and sem_seg_file_name, metadata
    stuff_classes=("background", circle, ...), ignore_label=255, evaluator_type="sem_seg"
    (Detectron2's SemSegEvaluator). Same images as :func:`register_shapes` with the same
    parameters. Re-registering a name replaces it.

    Returns:
        (image_root, label_root) that the data set will have.
    """
    if int(num_images) < 1 or int(image_size) < 16:
        raise ValueError(
            f"shapes data set '{name}': need num_images >= 1 and image_size >= 16, "
            f"got {num_images} and {image_size}"
        )
    root = datasets_root() if root is None else os.fspath(root)
    _, _, image_root = shapes_paths(root, split, num_images, image_size, seed)
    _, label_root = shapes_sem_seg_paths(root, split, num_images, image_size, seed)
    _replace_registration(name, announce=False)
    DatasetCatalog.register(
        name, lambda: _load_shapes_sem_seg(split, num_images, image_size, seed, root)
    )
    MetadataCatalog.get(name).set(
        image_root=image_root,
        sem_seg_root=label_root,
        evaluator_type="sem_seg",
        stuff_classes=list(SEM_SEG_CLASSES),
        ignore_label=SEM_SEG_IGNORE,
        shapes_params=dict(split=split, num_images=int(num_images),
                           image_size=int(image_size), seed=int(seed), root=root),
    )
    return image_root, label_root


def register_builtin_shapes(root=None):
    """Register shapes_{train,val} and shapes_sem_seg_{train,val} with their default
    parameters (no files made)."""
    for name, (split, num, seed_offset) in BUILTIN_SHAPES.items():
        register_shapes(name, split, num, _DEFAULT_SIZE, _DEFAULT_SEED + seed_offset, root)
    for name, (split, num, seed_offset) in BUILTIN_SHAPES_SEM_SEG.items():
        register_shapes_sem_seg(name, split, num, _DEFAULT_SIZE, _DEFAULT_SEED + seed_offset, root)


def prepare_datasets(cfg):
    """Re-register the built-in shapes data sets used by ``cfg`` (shapes_train/val,
    shapes_sem_seg_train/val) with its D2SEG.SHAPES parameters and generate their files
    if missing.

    Call before building any data loader or evaluator (every distributed rank may call
    it; concurrent generation is safe). Other data set names are left alone.

    Returns:
        dict: name -> json_file (instances) or label folder (semantic) for each shapes
        data set prepared.
    """
    sc = cfg.D2SEG.SHAPES
    prepared = {}
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name in prepared or (name not in BUILTIN_SHAPES and name not in BUILTIN_SHAPES_SEM_SEG):
            continue
        split, _, seed_offset = {**BUILTIN_SHAPES, **BUILTIN_SHAPES_SEM_SEG}[name]
        num = sc.NUM_TRAIN if split == "train" else sc.NUM_VAL
        seed = sc.SEED + seed_offset
        root = datasets_root()
        if name in BUILTIN_SHAPES_SEM_SEG:
            _, label_root = register_shapes_sem_seg(name, split, num, sc.IMAGE_SIZE, seed, root)
            generate_shapes_sem_seg(split, num, sc.IMAGE_SIZE, seed, root)
            prepared[name] = label_root
            continue
        json_file, _ = register_shapes(name, split, num, sc.IMAGE_SIZE, seed, root)
        if os.path.isfile(json_file):
            logger.info(f"Using {name} from {os.path.dirname(json_file)}")
        else:
            generate_shapes(split, num, sc.IMAGE_SIZE, seed, root)
        prepared[name] = json_file
    return prepared
