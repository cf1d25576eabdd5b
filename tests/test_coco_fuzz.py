"""Broken COCO files and images: each gets a clear error (naming the file) or a counted drop,
and nothing good is lost. Real files on disk, the real loader, mapper and pycocotools."""
import copy
import json
import logging
import random
import struct
import zlib

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data.detection_utils import SizeMismatchError

from d2seg.config import get_d2seg_cfg
from d2seg.data import (
    CocoFormatError,
    D2SegDatasetMapper,
    ImageReadError,
    load_coco_checked,
    read_image_8bit,
)

from conftest import square_polygon

SIZE = 64


def _good_json(n_images=3):
    """n 64x64 images with two good polygon instances each (ids 1..2n), two categories."""
    anns = []
    for i in range(n_images):
        for k, (x, y) in enumerate([(4, 6), (30, 28)]):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + k,
                         "bbox": [x, y, 20, 20], "segmentation": [square_polygon(x, y, 20)],
                         "area": 400, "iscrowd": 0})
    return {
        "images": [{"id": i + 1, "file_name": f"{i}.png", "height": SIZE, "width": SIZE}
                   for i in range(n_images)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _load(tmp_path, data, caplog=None):
    path = _write(tmp_path, data)
    if caplog is None:
        return load_coco_checked(path, str(tmp_path))
    with caplog.at_level(logging.INFO, logger="d2seg.data.coco"):
        recs = load_coco_checked(path, str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "d2seg.data.coco"]
    assert len(lines) == 1, lines  # one summary line per data set
    return recs, lines[0]


def _mapper(mask_format="bitmask"):
    cfg = get_d2seg_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = SIZE
    cfg.INPUT.MIN_SIZE_TEST = SIZE
    cfg.INPUT.MAX_SIZE_TEST = SIZE
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.MASK_FORMAT = mask_format
    cfg.MODEL.MASK_ON = True
    return D2SegDatasetMapper(cfg, is_train=True)


def _anns(recs):
    return [a for r in recs for a in r["annotations"]]


# ----------------------------------------------------------------------------------------
# clear errors
# ----------------------------------------------------------------------------------------
ERRORS = {
    "missing image key": (lambda d: d["images"][1].pop("width"), r"image with id=2 lacks .*'width'"),
    "missing annotation key": (lambda d: d["annotations"][3].pop("bbox"),
                               r"annotation with id=4 lacks .*'bbox'"),
    "missing category name": (lambda d: d["categories"][0].pop("name"),
                              r"category with id=1 lacks .*'name'"),
    "annotations not a list": (lambda d: d.update(annotations={"id": 1}), r"'annotations' must be a list"),
    "image not an object": (lambda d: d["images"].append([1, 2]), r"images\[3\] is a list"),
    "height as a string": (lambda d: d["images"][0].update(height="64"), r"image id=1 has invalid height"),
    "bbox as a string": (lambda d: d["annotations"][0].update(bbox="1,2,3,4"), r"annotation id=1 has bbox"),
    "bbox of strings": (lambda d: d["annotations"][0].update(bbox=["1", 2, 3, 4]), r"annotation id=1 has bbox"),
    "iscrowd as a string": (lambda d: d["annotations"][0].update(iscrowd="0"),
                            r"annotation id=1 has iscrowd '0'"),
    "unknown category": (lambda d: d["annotations"][2].update(category_id=7),
                         r"annotation id=3 has category_id=7"),
    "duplicate image ids": (lambda d: d["images"][2].update(id=1), r"image ids are not unique"),
    "duplicate annotation ids": (lambda d: d["annotations"][2].update(id=1), r"annotation ids are not unique"),
    "duplicate category ids": (lambda d: d["categories"][1].update(id=1), r"category ids are not unique"),
    "image id a list": (lambda d: d["images"][0].update(id=[1]), r"image.*id \[1\].*int or str"),
    "file_name not a string": (lambda d: d["images"][0].update(file_name=3), r"image id=1 has file_name 3"),
    "every box outside": (lambda d: [a.update(bbox=[100, 100, 5, 5]) for a in d["annotations"]],
                          r"every annotation was dropped.*6 x box outside the image"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_broken_file_gets_a_clear_error(tmp_path, case):
    data = _good_json()
    edit, pattern = ERRORS[case]
    edit(data)
    with pytest.raises(CocoFormatError, match=r"ann\.json") as info:
        _load(tmp_path, data)
    assert info.match(pattern)


# ----------------------------------------------------------------------------------------
# counted drops and changes; nothing good lost
# ----------------------------------------------------------------------------------------
def test_bad_annotations_are_counted_and_good_ones_kept_exactly(tmp_path, caplog):
    data = _good_json()
    good = copy.deepcopy(data["annotations"])
    bad = [
        {"bbox": [70, 10, 10, 10], "segmentation": [square_polygon(70, 10, 10)]},   # right of the image
        {"bbox": [10, -30, 10, 10], "segmentation": [square_polygon(10, -30, 10)]},  # above it
        {"bbox": [10, 10, 0, 10], "segmentation": [square_polygon(10, 10, 10)]},     # zero width
        {"bbox": [10, 10, 10, 10], "segmentation": []},                       # empty polygon list
        {"bbox": [10, 10, 10, 10], "segmentation": [[]]},                     # empty polygon
        {"bbox": [10, 10, 10, 10], "segmentation": [[1, 2, 3, 4]]},           # 2 points
        {"bbox": [10, 10, 10, 10], "segmentation": 5},                        # wrong type
        {"bbox": [10, 10, 10, 10], "segmentation": {"size": [SIZE, SIZE]}},   # RLE without counts
        {"bbox": [60, 10, 10, 10], "segmentation": [square_polygon(70, 10, 10)]},    # box in, polygon out
    ]
    for n, fields in enumerate(bad):
        data["annotations"].append({"id": 100 + n, "image_id": 1 + n % 3, "category_id": 1,
                                    "iscrowd": 0, **fields})
    data["annotations"].append({"id": 200, "image_id": 99, "category_id": 1, "iscrowd": 0,
                                "bbox": [1, 1, 5, 5], "segmentation": [square_polygon(1, 1, 5)]})
    # extra fields anywhere are ignored
    data["info"] = {"year": 2024}
    data["images"][0]["license"] = 3
    data["annotations"][0]["attributes"] = {"occluded": True}
    recs, line = _load(tmp_path, data, caplog)

    assert "3 images, 16 annotations, 6 kept; dropped 10 of 16 annotations" in line
    for text in ("2 x box outside the image", "1 x box with zero or negative width/height",
                 "3 x empty or invalid polygon (fewer than 3 points)", "1 x segmentation of type int",
                 "1 x RLE without 'counts'/'size'", "1 x polygon outside the image",
                 "1 x image_id not in 'images'", "is 'bbox' [x, y, width, height] in pixels"):
        assert text in line, (text, line)
    kept = _anns(recs)
    assert [a["bbox"] for a in kept] == [a["bbox"] for a in good]
    assert [a["segmentation"] for a in kept] == [a["segmentation"] for a in good]
    assert [a["category_id"] for a in kept] == [a["category_id"] - 1 for a in good]
    assert recs.load_summary.num_kept == 6 and recs.load_summary.annotations_differ


def test_clean_file_logs_one_info_line_and_changes_nothing(tmp_path, caplog):
    recs, line = _load(tmp_path, _good_json(), caplog)
    assert caplog.records[-1].levelno == logging.INFO
    assert line.endswith("3 images, 6 annotations, 6 kept")
    assert not recs.load_summary.annotations_differ


def test_crowd_and_missing_area_are_counted(tmp_path, caplog):
    data = _good_json()
    data["annotations"][0]["iscrowd"] = 1
    del data["annotations"][1]["area"]
    recs, line = _load(tmp_path, data, caplog)
    assert "6 kept" in line and "1 crowd annotations kept for evaluation only" in line
    assert "1 without 'area'" in line
    assert len(_anns(recs)) == 6


def test_box_and_mask_are_clipped_together(tmp_path, caplog):
    """A box larger than the image and one crossing its corner: both the box and the
    polygon are clipped to the image, and the mapper's mask fills exactly its box."""
    data = _good_json(1)
    data["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1,
         "bbox": [-10, -20, 100, 120], "segmentation": [square_polygon(-10, -20, 100)]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 1,
         "bbox": [50, 54, 20, 20], "segmentation": [square_polygon(50, 54, 20)]},
    ]
    cv2.imwrite(str(tmp_path / "0.png"), np.full((SIZE, SIZE, 3), 80, np.uint8))
    recs, line = _load(tmp_path, data, caplog)
    assert "changed 2 (2 x box and mask clipped to the image)" in line
    big, corner = _anns(recs)
    assert big["bbox"] == [0, 0, SIZE, SIZE] and corner["bbox"] == [50, 54, 14, 10]
    for a in (big, corner):
        xs, ys = a["segmentation"][0][0::2], a["segmentation"][0][1::2]
        assert 0 <= min(xs) and max(xs) <= SIZE and 0 <= min(ys) and max(ys) <= SIZE
    inst = _mapper()(recs[0])["instances"]
    assert inst.gt_boxes.tensor.tolist() == [[0, 0, SIZE, SIZE], [50, 54, SIZE, SIZE]]
    assert torch.equal(inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor)
    assert inst.gt_masks.tensor.sum(dim=(1, 2)).tolist() == [SIZE * SIZE, 14 * 10]
    # the polygon form too
    poly = _mapper("polygon")(recs[0])["instances"]
    assert torch.equal(poly.gt_masks.get_bounding_boxes().tensor, poly.gt_boxes.tensor)


def test_random_mutations_give_a_clear_error_or_a_counted_load(tmp_path):
    """300 seeded mutations of a good file (a key deleted, or a value replaced by one of
    another type): each load raises CocoFormatError naming the file, or returns records
    whose summary accounts for every annotation, with every untouched annotation kept."""
    rng = random.Random(0)
    values = [None, "x", -1, 0, 2.5, [], {}, [1, 2], True, [[1, 2, 3]], {"size": [1]}, 10 ** 9]
    outcomes = {"error": 0, "loaded": 0}
    for trial in range(300):
        data = _good_json()
        kind = rng.choice(["images", "annotations", "categories"])
        k = rng.randrange(len(data[kind]))
        entry = data[kind][k]
        key = rng.choice(sorted(entry) + ["iscrowd", "segmentation"])
        if rng.random() < 0.3:
            entry.pop(key, None)
        else:
            entry[key] = copy.deepcopy(rng.choice(values))
        touched = (kind, k)
        path = _write(tmp_path, data)
        try:
            recs = load_coco_checked(path, str(tmp_path))
        except CocoFormatError as e:
            assert "ann.json" in str(e), (trial, kind, key, str(e))
            outcomes["error"] += 1
            continue
        outcomes["loaded"] += 1
        s = recs.load_summary
        assert s.num_kept == len(_anns(recs)) == s.num_annotations - sum(s.dropped.values())
        if kind == "annotations":
            untouched = [a for n, a in enumerate(_good_json()["annotations"]) if n != k]
            kept = {tuple(a["bbox"]) for a in _anns(recs)}
            assert all(tuple(a["bbox"]) in kept for a in untouched), (trial, key)
        for rec in recs:  # every kept annotation can be evaluated by pycocotools
            for a in rec["annotations"]:
                segm = a["segmentation"]
                if isinstance(segm, list):
                    mask_util.frPyObjects(segm, rec["height"], rec["width"])
    assert outcomes["error"] > 30 and outcomes["loaded"] > 30, outcomes


# ----------------------------------------------------------------------------------------
# images: huge, tiny, corrupt, high bit depth
# ----------------------------------------------------------------------------------------
def _record(path, height, width, annotations=()):
    return {"file_name": str(path), "height": height, "width": width, "image_id": 5,
            "annotations": list(annotations)}


def _png_header_only(path, width, height):
    """A PNG that declares width x height (8-bit RGB) and has no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_huge_image_is_a_clear_error(tmp_path):
    _png_header_only(tmp_path / "huge.png", 40000, 40000)
    with pytest.raises(ImageReadError, match=r"huge\.png.*image_id=5.*DecompressionBomb"):
        _mapper()(_record(tmp_path / "huge.png", 40000, 40000))


def test_size_in_json_differs_from_file(tmp_path):
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((SIZE, SIZE, 3), np.uint8))
    with pytest.raises(SizeMismatchError, match=r"small\.png"):
        _mapper()(_record(tmp_path / "small.png", 100000, 100000))


def test_tiny_image_keeps_its_instance(tmp_path):
    data = _good_json(1)
    data["images"][0].update(height=2, width=3)
    data["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 6,
                            "bbox": [0, 0, 3, 2], "segmentation": [[0, 0, 3, 0, 3, 2, 0, 2]]}]
    cv2.imwrite(str(tmp_path / "0.png"), np.full((2, 3, 3), 200, np.uint8))
    recs = _load(tmp_path, data)
    inst = _mapper()(recs[0])["instances"]  # resized to a 64 px long side: 64 x 43
    assert len(inst) == 1 and inst.gt_boxes.tensor.tolist() == [[0, 0, 64, 43]]
    assert int(inst.gt_masks.tensor.sum()) == 64 * 43


def test_corrupt_image_is_a_clear_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ImageReadError, match=r"cannot read image '.*bad\.png' \(dataset record image_id=5\)"):
        _mapper()(_record(tmp_path / "bad.png", SIZE, SIZE))


def test_16bit_grayscale_is_scaled_not_saturated(tmp_path):
    """A 16-bit grayscale PNG (0..65535 across its columns) and a 16-bit TIFF reach the model
    scaled to 0..255 in training and at test time, as one 8-bit channel repeated in BGR."""
    ramp = np.tile(np.linspace(0, 65535, SIZE).round().astype(np.uint16), (SIZE, 1))
    expected = np.round(ramp.astype(np.float64) * 255 / 65535)
    for name in ("g16.png", "g16.tif"):
        assert cv2.imwrite(str(tmp_path / name), ramp)
        for is_train in (True, False):
            mapper = _mapper()
            mapper.is_train = is_train
            image = mapper(_record(tmp_path / name, SIZE, SIZE))["image"]
            assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
            assert np.abs(image[0].numpy() - expected).max() <= 1, name
            assert torch.equal(image[0], image[2])
    # 16-bit colour PNG: PIL keeps the 8 high bits, unchanged
    rgb16 = np.stack([ramp, ramp // 2, ramp // 4], -1)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16)
    bgr = read_image_8bit(str(tmp_path / "c16.png"), "BGR")
    assert np.array_equal(bgr, (rgb16 >> 8).astype(np.uint8))


def test_float_image_is_refused_clearly(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).random((SIZE, SIZE), dtype=np.float32)).save(
        tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match=r"f\.tif.*floating-point image.*8-bit"):
        _mapper()(_record(tmp_path / "f.tif", SIZE, SIZE))


# ----------------------------------------------------------------------------------------
# evaluation on what the loader kept
# ----------------------------------------------------------------------------------------
def _evaluate(tmp_path, data, tasks):
    """CheckedCOCOEvaluator on ``data`` registered as a data set, with one prediction (box
    and mask) on each image."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import Boxes, Instances

    from d2seg.data import CheckedCOCOEvaluator, register_coco_dataset

    register_coco_dataset("_fuzz_eval", _write(tmp_path, data), str(tmp_path))
    try:
        ev = CheckedCOCOEvaluator("_fuzz_eval", tasks=tasks, output_dir=None)
        ev.reset()
        for img in data["images"]:
            inst = Instances((SIZE, SIZE))
            inst.pred_boxes = Boxes(torch.tensor([[4.0, 6.0, 24.0, 26.0]]))
            inst.scores, inst.pred_classes = torch.tensor([0.9]), torch.tensor([0])
            inst.pred_masks = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
            inst.pred_masks[0, 6:26, 4:24] = True
            ev.process([{"image_id": img["id"], "height": SIZE, "width": SIZE}], [{"instances": inst}])
        return ev.evaluate()
    finally:
        DatasetCatalog.remove("_fuzz_eval")
        MetadataCatalog.remove("_fuzz_eval")


@pytest.mark.parametrize("tasks", [("bbox", "segm"), None], ids=["trainer-tasks", "tasks-from-predictions"])
@pytest.mark.parametrize("segmentation", ["empty list", "absent"])
@pytest.mark.parametrize("dropped", [False, True], ids=["clean", "one-dropped"])
def test_box_only_ground_truth_is_evaluated_on_boxes(tmp_path, tasks, segmentation, dropped):
    """A box-only data set (which the loader accepts) with a mask model: pycocotools' mask
    evaluation crashed at the end of a training (KeyError 'segmentation' or IndexError);
    the boxes are evaluated, the masks are not."""
    data = _good_json()
    for a in data["annotations"]:
        if segmentation == "empty list":
            a["segmentation"] = []
        else:
            del a["segmentation"]
    if dropped:
        data["annotations"][-1]["bbox"] = [100, 100, 5, 5]  # outside: the records differ from the file
    results = _evaluate(tmp_path, data, tasks)
    assert set(results) == {"bbox"} and results["bbox"]["AP"] > 0


def test_ground_truth_with_masks_is_evaluated_on_masks_too(tmp_path):
    results = _evaluate(tmp_path, _good_json(), ("bbox", "segm"))
    assert set(results) == {"bbox", "segm"} and results["segm"]["AP"] > 0
