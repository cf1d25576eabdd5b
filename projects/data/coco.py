"""Registering COCO-format instances data through a loader that checks its input.

:func:`register_coco_dataset` is what a user calls for their own data (the counterpart of
Detectron2's ``register_coco_instances``). Its loader, :func:`load_coco_checked`, turns a
broken file into an error that names the file, the missing key and the offending
image/annotation id, and drops or clips the annotations that would otherwise be lost
silently or crash later (in a loss, or in pycocotools at evaluation): boxes with zero or
negative width/height, boxes outside the image, empty or invalid segmentations. Boxes
that cross the image border are clipped to it, and so are their polygons, so box and mask
stay consistent. One summary line per data set counts every annotation dropped or changed
(and the crowd ones, which training skips) by reason; a data set that loses every
annotation is an error. The records it returns are a :class:`CheckedRecords` list whose
``load_summary`` says what happened, so that the evaluator can use the same cleaned
annotations (:class:`d2seg.data.CheckedCOCOEvaluator`).
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


class LoadSummary:
    """What :func:`load_coco_checked` did to a file's annotations.

    Attributes:
        source (str): the json file (and the data set's name when known).
        num_images, num_annotations (int): in the file.
        dropped (Counter): reason -> number of annotations dropped.
        changed (Counter): reason -> number of annotations kept but changed (clipped).
        crowd (int): crowd annotations kept (evaluation only: training skips them).
        missing_area (int): kept annotations without a numeric "area" (COCOeval needs one).
    """

    def __init__(self, source, num_images, num_annotations):
        self.source = source
        self.num_images = num_images
        self.num_annotations = num_annotations
        self.dropped = Counter()
        self.changed = Counter()
        self.crowd = 0
        self.missing_area = 0

    @property
    def num_kept(self):
        return self.num_annotations - sum(self.dropped.values())

    @property
    def annotations_differ(self):
        """True when the records differ from the file's annotations in a way that the
        evaluator must see (dropped, changed or area-less annotations)."""
        return bool(self.dropped or self.changed or self.missing_area)

    def line(self):
        """The one-line summary."""
        def counts(counter):
            return ", ".join(f"{n} x {why}" for why, n in sorted(counter.items()))

        parts = [f"{self.source}: {self.num_images} images, {self.num_annotations} annotations, "
                 f"{self.num_kept} kept"]
        if self.dropped:
            parts.append(f"dropped {sum(self.dropped.values())} of {self.num_annotations} "
                         f"annotations ({counts(self.dropped)})")
        if self.changed:
            parts.append(f"changed {sum(self.changed.values())} ({counts(self.changed)})")
        if self.crowd:
            parts.append(f"{self.crowd} crowd annotations kept for evaluation only (training "
                         "skips them)")
        if self.missing_area:
            parts.append(f"{self.missing_area} without 'area' (the evaluator computes it)")
        if self.dropped.get(_OUTSIDE):
            parts.append("boxes outside the image: is 'bbox' [x, y, width, height] in pixels "
                         "of the image's 'width' x 'height'?")
        return "; ".join(parts)


class CheckedRecords(list):
    """The list of Detectron2 records returned by :func:`load_coco_checked`, with its
    :class:`LoadSummary` as ``load_summary``."""

    load_summary = None


_OUTSIDE = "box outside the image"
_CLIPPED = "box and mask clipped to the image"
_POLYGON_OUTSIDE = "polygon outside the image"
_POLYGON_PART = "invalid polygon part removed (the rest kept)"


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
                singular = {"categories": "category"}.get(kind, kind[:-1])
                raise CocoFormatError(
                    f"'{json_file}': {singular} with {ident} lacks the required key '{key}'"
                )


def _is_id(v, ints_only=False):
    """An id (or a size) as COCO has them: an int, or a str unless ``ints_only``; not a
    bool."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (not ints_only and isinstance(v, str))


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _clip_polygon(poly, width, height):
    """The part of a flat polygon [x0, y0, x1, y1, ...] inside [0, width] x [0, height]
    (Sutherland-Hodgman against the four sides: exact for convex polygons, and for a
    concave one it covers the same area, with zero-width edges along the border). Returns
    a flat list, with fewer than 6 values when nothing is left."""
    points = list(zip(poly[0::2], poly[1::2]))
    # each side: (is inside, intersection of the segment a-b with the side's line)
    sides = (
        (lambda p: p[0] >= 0, lambda a, b: (0.0, a[1] + (b[1] - a[1]) * (0 - a[0]) / (b[0] - a[0]))),
        (lambda p: p[0] <= width,
         lambda a, b: (float(width), a[1] + (b[1] - a[1]) * (width - a[0]) / (b[0] - a[0]))),
        (lambda p: p[1] >= 0, lambda a, b: (a[0] + (b[0] - a[0]) * (0 - a[1]) / (b[1] - a[1]), 0.0)),
        (lambda p: p[1] <= height,
         lambda a, b: (a[0] + (b[0] - a[0]) * (height - a[1]) / (b[1] - a[1]), float(height))),
    )
    for inside, cross in sides:
        if not points:
            break
        out = []
        for i, cur in enumerate(points):
            prev = points[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        points = out
    return [float(v) for p in points for v in p]


def _segmentation_problem(segm, height, width, changes):
    """Returns (why, cleaned): ``why`` says why ``segm`` cannot be used, or is None; then
    ``cleaned`` is the segmentation to keep (invalid parts of a multi-polygon removed,
    polygons clipped to the image, uncompressed RLE compressed, counts as str). What was
    changed is added to the set ``changes``. Polygons of zero area are left to Detectron2's
    filter_empty_instances (computing every polygon's area costs too much on COCO-sized
    files)."""
    if isinstance(segm, list):
        polys = [
            p for p in segm
            if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(_is_number(v) for v in p)
        ]
        if not polys:
            return "empty or invalid polygon (fewer than 3 points)", None
        if len(polys) < len(segm):
            changes.add(_POLYGON_PART)
        clipped = []
        for p in polys:
            if min(p) < 0 or max(p[0::2]) > width or max(p[1::2]) > height:
                changes.add(_CLIPPED)
                p = _clip_polygon(p, width, height)
            if len(p) >= 6:
                clipped.append(p)
        if not clipped:
            return _POLYGON_OUTSIDE, None
        return None, clipped
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "RLE without 'counts'/'size'", None
        if segm["size"] != [height, width]:
            return f"RLE size {segm['size']!r} differs from the image's [{height}, {width}]", None
        if not isinstance(segm["counts"], (list, str)):
            return "RLE 'counts' neither a list nor a string", None
        try:
            if isinstance(segm["counts"], list):
                segm = mask_util.frPyObjects(segm, height, width)
            else:
                segm = dict(segm)
            area = int(mask_util.area(segm))
        except Exception:  # malformed counts (pycocotools raises various types)
            return "undecodable RLE", None
        if area == 0:
            return "empty RLE mask", None
        if isinstance(segm["counts"], bytes):
            segm["counts"] = segm["counts"].decode("ascii")
        return None, segm
    return f"segmentation of type {type(segm).__name__}", None


def _clip_box(bbox, width, height):
    """XYWH ``bbox`` clipped to the image, or None when nothing of it is inside."""
    x0, y0 = max(bbox[0], 0), max(bbox[1], 0)
    x1, y1 = min(bbox[0] + bbox[2], width), min(bbox[1] + bbox[3], height)
    if x1 <= x0 or y1 <= y0:
        return None
    if (x0, y0, x1, y1) == (bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]):
        return bbox
    return [x0, y0, x1 - x0, y1 - y0]


def load_coco_checked(json_file, image_root, dataset_name=None):
    """Load a COCO instances json into Detectron2's list[dict] records, checking it.

    Args:
        json_file (str): COCO instances annotation file.
        image_root (str): folder that the images' ``file_name`` are relative to.
        dataset_name (str or None): when given, sets ``thing_classes`` and
            ``thing_dataset_id_to_contiguous_id`` in its metadata (as load_coco_json).

    Returns:
        CheckedRecords: Detectron2's records (a list of dicts, image ids in order), with
        ``load_summary`` (:class:`LoadSummary`), whose line is logged (WARNING when an
        annotation was dropped or changed, else INFO).

    Annotations dropped (counted by reason): box with zero or negative width/height, box
    outside the image, annotation of an unknown image, empty / invalid / outside polygon,
    empty or wrongly sized or undecodable RLE, no mask in a data set with masks. Changed
    (counted): a box crossing the image border is clipped to it and so are its polygons;
    invalid parts of a multi-part polygon are removed.

    Raises:
        FileNotFoundError: ``json_file`` does not exist.
        CocoFormatError (a ValueError): not valid JSON, a required key is missing
            (top-level images/annotations/categories; per image id/file_name/height/width;
            per annotation id/image_id/category_id/bbox; per category id/name), duplicate
            ids, a malformed bbox, an annotation pointing at an unknown category, or a
            file whose annotations are all dropped (the error holds the summary).
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
        for n, e in enumerate(entries):
            if not _is_id(e["id"], ints_only=kind == "category"):
                raise CocoFormatError(
                    f"'{json_file}': {kind} at index {n} has id {e['id']!r}; expected an int"
                    + ("" if kind == "category" else " or str"))
        dup = [i for i, c in Counter(e["id"] for e in entries).items() if c > 1]
        if dup:
            raise CocoFormatError(f"'{json_file}': {kind} ids are not unique (e.g. id={dup[0]})")
    for img in images:
        h, w = img["height"], img["width"]
        if not (_is_id(h, True) and _is_id(w, True) and h > 0 and w > 0):
            raise CocoFormatError(
                f"'{json_file}': image id={img['id']} has invalid height/width {h!r}/{w!r}"
            )
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise CocoFormatError(f"'{json_file}': image id={img['id']} has file_name "
                                  f"{img['file_name']!r}; expected a path relative to the image root")
    for c in cats:
        if not isinstance(c["name"], str):
            raise CocoFormatError(f"'{json_file}': category id={c['id']} has name {c['name']!r}; "
                                  "expected a string")

    cat_ids = sorted(c["id"] for c in cats)
    id_map = {cid: i for i, cid in enumerate(cat_ids)}
    if dataset_name is not None:
        names = {c["id"]: c["name"] for c in cats}
        meta = MetadataCatalog.get(dataset_name)
        meta.thing_classes = [names[i] for i in cat_ids]
        meta.thing_dataset_id_to_contiguous_id = id_map

    img_by_id = {img["id"]: img for img in images}
    per_image = {img["id"]: [] for img in images}
    source = f"'{dataset_name}' ({json_file})" if dataset_name else f"'{json_file}'"
    summary = LoadSummary(source, len(images), len(anns))
    dropped = summary.dropped
    has_masks = any(a.get("segmentation") for a in anns)
    for ann in anns:
        aid = ann["id"]
        for key in ("image_id", "category_id"):
            if not _is_id(ann[key]):
                raise CocoFormatError(f"'{json_file}': annotation id={aid} has {key} "
                                      f"{ann[key]!r}; expected an int or str")
        if not (_is_number(ann.get("iscrowd", 0)) and ann.get("iscrowd", 0) in (0, 1)):
            raise CocoFormatError(f"'{json_file}': annotation id={aid} has iscrowd "
                                  f"{ann['iscrowd']!r}; expected 0 or 1")
        if ann["image_id"] not in img_by_id:
            dropped["image_id not in 'images'"] += 1
            continue
        img = img_by_id[ann["image_id"]]
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
        changes = set()
        clipped_box = _clip_box(bbox, img["width"], img["height"])
        if clipped_box is None:
            dropped[_OUTSIDE] += 1
            continue
        if clipped_box != bbox:
            changes.add(_CLIPPED)
        obj = {k: ann[k] for k in _RECORD_ANN_KEYS if k in ann}
        obj["bbox"] = clipped_box
        obj["category_id"] = id_map[ann["category_id"]]
        obj["bbox_mode"] = BoxMode.XYWH_ABS
        if has_masks:
            if "segmentation" not in ann:
                dropped["no segmentation in a data set with masks"] += 1
                continue
            why, segm = _segmentation_problem(ann["segmentation"], img["height"], img["width"],
                                              changes)
            if why is not None:
                dropped[why] += 1
                continue
            obj["segmentation"] = segm
        if ann.get("keypoints") is not None and not (
                isinstance(ann["keypoints"], list) and len(ann["keypoints"]) % 3 == 0
                and all(_is_number(v) for v in ann["keypoints"])):
            raise CocoFormatError(f"'{json_file}': annotation id={aid} has keypoints that are "
                                  "not a list of numbers [x1, y1, v1, ...]")
        if ann.get("keypoints"):
            # COCO keypoints are pixel indices; Detectron2 wants continuous coordinates.
            obj["keypoints"] = [v + 0.5 if i % 3 != 2 else v for i, v in enumerate(ann["keypoints"])]
        summary.missing_area += not _is_number(ann.get("area"))
        summary.changed.update(changes)
        summary.crowd += bool(obj.get("iscrowd", 0))
        per_image[ann["image_id"]].append(obj)

    if summary.num_annotations and summary.num_kept == 0:
        raise CocoFormatError(f"every annotation was dropped: {summary.line()}")
    (logger.warning if summary.dropped or summary.changed else logger.info)(summary.line())

    records = CheckedRecords()
    records.load_summary = summary
    for image_id in sorted(img_by_id, key=lambda i: (isinstance(i, str), i)):
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
