"""Registering COCO-format instances data through a loader that checks its input.

:func:`register_coco_dataset` is what a user calls for their own data (the counterpart of
Detectron2's ``register_coco_instances``). Its loader, :func:`load_coco_checked`, turns a
broken file into an error that names the file, the missing key and the offending
image/annotation id, and drops annotations that would otherwise crash later inside a
loss (boxes with zero or negative width/height, empty or invalid segmentations), logging
how many it dropped and why.
"""
import json
import logging
import math
import os
from collections import Counter

import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
_CATEGORY_KEYS = ("id", "name")
# Per-annotation keys copied into Detectron2's records (as load_coco_json does).
_RECORD_ANN_KEYS = ("iscrowd", "bbox", "category_id")


class CocoFormatError(ValueError):
    """A COCO json file that does not have the required structure."""


def _read_json(json_file):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file '{json_file}' does not exist")
    try:
        with open(json_file, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"'{json_file}' is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"'{json_file}' is not a UTF-8 text (JSON) file: {e}") from e


def _require(entries, keys, kind, json_file):
    """Check that every entry of the top-level list ``kind`` is a dict with ``keys``."""
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CocoFormatError(
                f"'{json_file}': {kind}[{n}] is a {type(entry).__name__}, expected an object"
            )
        for key in keys:
            if key not in entry:
                ident = f"id={entry['id']}" if "id" in entry else f"index {n}"
                raise CocoFormatError(
                    f"'{json_file}': {kind[:-1]} with {ident} lacks the required key '{key}'"
                )


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _segmentation_problem(segm, height, width):
    """Returns (why, cleaned): ``why`` says why ``segm`` cannot be used, or is None; then
    ``cleaned`` is the segmentation to keep (invalid parts of a multi-polygon removed,
    uncompressed RLE compressed, counts as str). Polygons of zero area are left to
    Detectron2's filter_empty_instances (computing every polygon's area costs too much
    on COCO-sized files)."""
    if isinstance(segm, list):
        polys = [
            p for p in segm
            if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(_is_number(v) for v in p)
        ]
        if not polys:
            return "empty or invalid polygon", None
        return None, polys
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "RLE without 'counts'/'size'", None
        if isinstance(segm["counts"], list):
            segm = mask_util.frPyObjects(segm, *segm["size"])
        elif isinstance(segm["counts"], str):
            segm = dict(segm)
        else:
            return "RLE 'counts' neither a list nor a string", None
        if list(segm["size"]) != [height, width]:
            return f"RLE size {list(segm['size'])} differs from the image's [{height}, {width}]", None
        try:
            area = int(mask_util.area(segm))
        except Exception as e:  # malformed counts string
            return f"undecodable RLE ({e})", None
        if area == 0:
            return "empty RLE mask", None
        if isinstance(segm["counts"], bytes):
            segm["counts"] = segm["counts"].decode("ascii")
        return None, segm
    return f"segmentation of type {type(segm).__name__}", None


def load_coco_checked(json_file, image_root, dataset_name=None):
    """Load a COCO instances json into Detectron2's list[dict] records, checking it.

    Args:
        json_file (str): COCO instances annotation file.
        image_root (str): folder that the images' ``file_name`` are relative to.
        dataset_name (str or None): when given, sets ``thing_classes`` and
            ``thing_dataset_id_to_contiguous_id`` in its metadata (as load_coco_json).

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        CocoFormatError (a ValueError): not valid JSON, a required key is missing
            (top-level images/annotations/categories; per image id/file_name/height/width;
            per annotation id/image_id/category_id/bbox; per category id/name), duplicate
            ids, a malformed bbox, or an annotation pointing at an unknown category.
    """
    json_file = os.fspath(json_file)
    data = _read_json(json_file)
    if not isinstance(data, dict):
        raise CocoFormatError(f"'{json_file}': top level is a {type(data).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"'{json_file}' lacks the required top-level key '{key}'")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"'{json_file}': '{key}' must be a list")
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    _require(images, _IMAGE_KEYS, "images", json_file)
    _require(anns, _ANNOTATION_KEYS, "annotations", json_file)
    _require(cats, _CATEGORY_KEYS, "categories", json_file)
    if not cats:
        raise CocoFormatError(f"'{json_file}' has an empty 'categories' list")

    for kind, entries in (("image", images), ("annotation", anns), ("category", cats)):
        dup = [i for i, c in Counter(e["id"] for e in entries).items() if c > 1]
        if dup:
            raise CocoFormatError(f"'{json_file}': {kind} ids are not unique (e.g. id={dup[0]})")
    for img in images:
        h, w = img["height"], img["width"]
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            raise CocoFormatError(
                f"'{json_file}': image id={img['id']} has invalid height/width {h}/{w}"
            )

    cat_ids = sorted(c["id"] for c in cats)
    id_map = {cid: i for i, cid in enumerate(cat_ids)}
    if dataset_name is not None:
        names = {c["id"]: c["name"] for c in cats}
        meta = MetadataCatalog.get(dataset_name)
        meta.thing_classes = [names[i] for i in cat_ids]
        meta.thing_dataset_id_to_contiguous_id = id_map

    img_by_id = {img["id"]: img for img in images}
    per_image = {img["id"]: [] for img in images}
    dropped = Counter()
    has_masks = any(a.get("segmentation") for a in anns)
    for ann in anns:
        aid = ann["id"]
        if ann["image_id"] not in img_by_id:
            dropped["image_id not in 'images'"] += 1
            continue
        if ann["category_id"] not in id_map:
            raise CocoFormatError(
                f"'{json_file}': annotation id={aid} has category_id={ann['category_id']}, "
                "which is not in 'categories'"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise CocoFormatError(
                f"'{json_file}': annotation id={aid} has bbox {bbox!r}; expected [x, y, w, h]"
            )
        if ann.get("ignore", 0):
            raise CocoFormatError(
                f"'{json_file}': annotation id={aid} uses 'ignore', which is not supported"
            )
        if bbox[2] <= 0 or bbox[3] <= 0:
            dropped["box with zero or negative width/height"] += 1
            continue
        obj = {k: ann[k] for k in _RECORD_ANN_KEYS if k in ann}
        obj["category_id"] = id_map[ann["category_id"]]
        obj["bbox_mode"] = BoxMode.XYWH_ABS
        if has_masks:
            if "segmentation" not in ann:
                dropped["no segmentation in a data set with masks"] += 1
                continue
            img = img_by_id[ann["image_id"]]
            why, segm = _segmentation_problem(ann["segmentation"], img["height"], img["width"])
            if why is not None:
                dropped[why] += 1
                continue
            obj["segmentation"] = segm
        if ann.get("keypoints"):
            # COCO keypoints are pixel indices; Detectron2 wants continuous coordinates.
            obj["keypoints"] = [v + 0.5 if i % 3 != 2 else v for i, v in enumerate(ann["keypoints"])]
        per_image[ann["image_id"]].append(obj)

    if dropped:
        detail = ", ".join(f"{n} x {why}" for why, n in sorted(dropped.items()))
        logger.warning(
            f"Dropped {sum(dropped.values())} of {len(anns)} annotations in '{json_file}': {detail}"
        )

    records = []
    for image_id in sorted(img_by_id):
        img = img_by_id[image_id]
        records.append(
            {
                "file_name": os.path.join(image_root, img["file_name"]),
                "height": img["height"],
                "width": img["width"],
                "image_id": image_id,
                "annotations": per_image[image_id],
            }
        )
    logger.info(f"Loaded {len(records)} images in COCO format from {json_file}")
    return records


def _replace_registration(name, announce=True):
    """Remove ``name`` from DatasetCatalog and MetadataCatalog if it is there."""
    if name in DatasetCatalog.list():
        if announce:
            logger.info(f"Data set '{name}' was registered already; replacing it")
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_coco_dataset(name, json_file, image_root, metadata=None):
    """Register COCO-format instances data under ``name`` for Detectron2, checked on load.

    Same metadata as Detectron2's ``register_coco_instances``: json_file, image_root,
    evaluator_type="coco" (+ thing_classes and thing_dataset_id_to_contiguous_id, set when
    the data set is first loaded). A name that is registered already is replaced.

    Args:
        name (str): the data set's name, used in cfg.DATASETS.TRAIN / TEST.
        json_file (str): COCO instances annotation file.
        image_root (str): folder that the images' ``file_name`` are relative to.
        metadata (dict or None): extra metadata (e.g. thing_colors).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"data set name must be a non-empty str, got {name!r}")
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    _replace_registration(name)
    DatasetCatalog.register(name, lambda: load_coco_checked(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **(metadata or {})
    )
