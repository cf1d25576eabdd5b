"""The number of classes of every method follows the training data.

Each method has its own class-count key. When a config leaves such a key at its default,
:func:`apply_dataset_classes` sets it to the number of classes of the training data sets
(``thing_classes`` for instance keys, ``stuff_classes`` for semantic ones, from Detectron2's
MetadataCatalog), and logs it. When a config sets a key to another number than its data, it
stops with an error naming the key, both numbers and the data set. An 80-class COCO config
therefore trains on a 5-class data set without editing the config, and a 5-class config on
80-class data is refused instead of training a head of the wrong size.

A key equal to its default is taken as "left at its default": a config that sets 80 on
purpose for a 5-class data set is adjusted like one that does not mention the key.
"""
import json
import logging

from detectron2.data import MetadataCatalog

__all__ = ["CLASS_KEYS", "apply_dataset_classes", "dataset_class_count"]

logger = logging.getLogger(__name__)

# (config key, metadata attribute with the class names)
CLASS_KEYS = (
    ("MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes"),  # Mask R-CNN, PointRend (instance)
    ("MODEL.RETINANET.NUM_CLASSES", "thing_classes"),  # RetinaNet, PointINS (RetinaNet)
    ("MODEL.FCOS.NUM_CLASSES", "thing_classes"),  # FCOS, PointINS, MEInst, CondInst, BlendMask
    ("MODEL.SOLO.NUM_CLASSES", "thing_classes"),  # SOLO, Decoupled SOLO, SOLOv2
    ("MODEL.SPARSE_INST.DECODER.NUM_CLASSES", "thing_classes"),  # SparseInst (+ PointRend)
    ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes"),  # Semantic FPN, PointRend (semantic)
)


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def _set(cfg, key, value):
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, leaf, value)


def _coco_category_count(json_file):
    try:
        with open(json_file) as f:
            categories = json.load(f).get("categories")
    except (OSError, ValueError, AttributeError):
        return None  # the data set's own loader reports a bad file with its reasons
    return len(categories) if isinstance(categories, list) else None


def dataset_class_count(dataset_names, attribute):
    """(count, names) of ``attribute`` over the registered ``dataset_names``; count is None
    when none of them has it. Raises ValueError when they disagree."""
    found = {}
    for name in dataset_names:
        if name not in MetadataCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        classes = meta.get(attribute, None)
        if classes is not None:
            found[name] = len(classes)
        elif attribute == "thing_classes" and meta.get("json_file", None):
            # COCO-format data registered by d2seg or Detectron2 gets its thing_classes when
            # first loaded: count the categories of its file now
            n = _coco_category_count(meta.json_file)
            if n is not None:
                found[name] = n
    if not found:
        return None, []
    if len(set(found.values())) > 1:
        raise ValueError(f"DATASETS.TRAIN: the data sets have different numbers of {attribute}: "
                         + ", ".join(f"{n}: {c}" for n, c in found.items()))
    return next(iter(found.values())), list(found)


def apply_dataset_classes(cfg, defaults):
    """Set every class-count key of ``cfg`` (mutable) that is at its value in ``defaults``
    (a config of the same keys with nothing merged) to the training data's class count;
    raise ValueError for a key set to another number. Returns the keys changed."""
    changed = []
    notes = {}
    for key, attribute in CLASS_KEYS:
        value, default = _get(cfg, key), _get(defaults, key)
        if value is None:
            continue
        count, names = dataset_class_count(cfg.DATASETS.TRAIN, attribute)
        if count is None or value == count:
            continue
        if value != default:
            raise ValueError(
                f"{key} is {value} in the config, but the training data ({', '.join(names)}) has "
                f"{count} {attribute}: set {key} {count}, or leave it at its default ({default}) to "
                "follow the data")
        _set(cfg, key, count)
        changed.append(key)
        notes.setdefault((attribute, count, ", ".join(names)), []).append(f"{key} ({value})")
    for (attribute, count, names), keys in notes.items():
        logger.info(f"Class counts follow the training data: {count} {attribute} in {names}; set "
                    f"{', '.join(keys)} (left at their defaults) to {count}")
    return changed
