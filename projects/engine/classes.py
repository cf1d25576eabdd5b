"""The number of classes of every method follows the training data.

Each method has its own class-count key (:data:`CLASS_KEYS`). When neither the config file
(with its ``_BASE_`` files) nor the command line sets such a key, :func:`apply_dataset_classes`
sets it to the number of classes of the training data sets (``thing_classes`` for instance
keys, ``stuff_classes`` for semantic ones, from Detectron2's MetadataCatalog) and logs it.
A key that the config sets, to any number (its default included: an explicit 80 means 80),
must agree with the data: otherwise setup stops with one error that names every
conflicting key, both numbers, the data set and the override that fixes it. An 80-class COCO
config (which leaves its class keys unset) therefore trains on a 5-class data set without
editing the config, and a 5-class config on 80-class data is refused instead of training a
head of the wrong size.

The category count of a registered COCO file that was not loaded yet is read from the file
once per file version (path, size and modification time), not on every config set-up.
"""
import functools
import json
import logging
import os

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog

__all__ = ["CLASS_KEYS", "apply_dataset_classes", "config_class_keys", "dataset_class_count"]

logger = logging.getLogger(__name__)

# (config key, metadata attribute with the class names)
CLASS_KEYS = (
    ("MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes"),  # Mask R-CNN, PointRend (instance)
    ("MODEL.RETINANET.NUM_CLASSES", "thing_classes"),  # RetinaNet, PointINS (RetinaNet)
    ("MODEL.FCOS.NUM_CLASSES", "thing_classes"),  # FCOS, PointINS, MEInst, CondInst, BlendMask
    ("MODEL.BASIS_MODULE.NUM_CLASSES", "thing_classes"),  # BlendMask's auxiliary semantic loss
    ("MODEL.SOLO.NUM_CLASSES", "thing_classes"),  # SOLO, Decoupled SOLO, SOLOv2
    ("MODEL.SPARSE_INST.DECODER.NUM_CLASSES", "thing_classes"),  # SparseInst (+ PointRend)
    ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes"),  # Semantic FPN, PointRend (semantic)
)


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def _set(cfg, key, value):
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[leaf] = value


def _section(key):
    return key.rsplit(".", 1)[0]


def config_class_keys(config_file=None, opts=()):
    """What a config says about the class keys of :data:`CLASS_KEYS`: (the keys that
    ``config_file``, its ``_BASE_`` files or the ``opts`` list (KEY VALUE pairs) set,
    whatever the value; the sections of those keys, e.g. ``MODEL.FCOS``, that they name at
    all: the model's own class keys)."""
    keys = {key for key, _ in CLASS_KEYS}
    set_keys, sections = set(), set()
    if config_file:
        loaded = CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
        set_keys.update(key for key in keys if _get(loaded, key) is not None)
        sections.update(_section(key) for key in keys if isinstance(_get(loaded, _section(key)), dict))
    for k in list(opts)[0::2]:
        if k in keys:
            set_keys.add(k)
        sections.update(_section(key) for key in keys if k.startswith(_section(key) + "."))
    return set_keys, sections


@functools.lru_cache(maxsize=64)
def _coco_category_count_of_version(json_file, size, mtime_ns):
    try:
        with open(json_file) as f:
            categories = json.load(f).get("categories")
    except (OSError, ValueError, AttributeError):
        return None  # the data set's own loader reports a bad file with its reasons
    return len(categories) if isinstance(categories, list) else None


def _coco_category_count(json_file):
    """Number of ``categories`` in a COCO file, read once per version of the file."""
    try:
        st = os.stat(json_file)
    except OSError:
        return None
    return _coco_category_count_of_version(os.path.abspath(json_file), st.st_size, st.st_mtime_ns)


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


def apply_dataset_classes(cfg, explicit=(), named=None):
    """Set every class-count key of ``cfg`` (mutable) that is not in ``explicit`` (the keys
    the config sets, see :func:`config_class_keys`) to the training data's class count, and
    log it (naming the keys whose section is in ``named``, the model's own, and counting the
    others); raise ValueError naming every explicit key with another number than the data.
    Returns the keys changed."""
    changed, conflicts = [], []
    notes = {}
    for key, attribute in CLASS_KEYS:
        value = _get(cfg, key)
        if value is None:
            continue
        count, names = dataset_class_count(cfg.DATASETS.TRAIN, attribute)
        if count is None or value == count:
            continue
        if key in explicit:
            conflicts.append((key, value, count, attribute, ", ".join(names)))
            continue
        _set(cfg, key, count)
        changed.append(key)
        notes.setdefault((attribute, count, ", ".join(names)), []).append(f"{key} ({value})")
    if conflicts:
        raise ValueError(
            "; ".join(f"{key} is {value} in the config, but the training data ({names}) has {count} "
                      f"{attribute}" for key, value, count, attribute, names in conflicts)
            + ": add '" + " ".join(f"{c[0]} {c[2]}" for c in conflicts) + "' to the command line "
            "(or remove the key from the config to follow the data)")
    for (attribute, count, names), keys in notes.items():
        own = [k for k in keys if named is None or _section(k.split(" ")[0]) in named]
        if not own:  # only the other methods' keys changed: nothing the model reads
            continue
        others = f" (and {len(keys) - len(own)} class key(s) of other methods)" if len(own) < len(keys) else ""
        logger.info(f"Class counts follow the training data: {count} {attribute} in {names}; set "
                    f"{', '.join(own)} (not set by the config) to {count}{others}")
    return changed
