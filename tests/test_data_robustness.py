"""Bad input to the data layer gives clear errors or is dropped, never a crash later."""
import json
import logging
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, PolygonMasks
from detectron2.utils.events import EventStorage

import d2seg  # noqa: F401
from d2seg.config import get_d2seg_cfg
from d2seg.data import (
    CocoFormatError,
    D2SegDatasetMapper,
    ImageReadError,
    load_coco_checked,
    register_coco_dataset,
)

from conftest import square_polygon

SIZE = 64
REPO = os.path.join(os.path.dirname(__file__), "..")


def _base_json(n_images=2):
    """Two 64x64 images, two categories, one good polygon instance per image."""
    return {
        "images": [
            {"id": i + 1, "file_name": f"{i}.jpg", "height": SIZE, "width": SIZE}
            for i in range(n_images)
        ],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [10, 10, 20, 20],
             "segmentation": [square_polygon(10, 10, 20)], "area": 400, "iscrowd": 0}
            for i in range(n_images)
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _write(tmp_path, data, n_images=2, name="ann.json"):
    for i in range(n_images):
        img = np.full((SIZE, SIZE, 3), 40 * i + 50, np.uint8)
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), img)
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.fixture
def register(request):
    names = []

    def _register(name, json_file, image_root):
        names.append(name)
        register_coco_dataset(name, json_file, image_root)

    yield _register
    for n in names:
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
        if n in MetadataCatalog.list():
            MetadataCatalog.remove(n)


def _cfg(mask_format="bitmask"):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "quick", "mask_rcnn_shapes.yaml"))
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = SIZE
    cfg.INPUT.MIN_SIZE_TEST = SIZE
    cfg.INPUT.MAX_SIZE_TEST = SIZE
    cfg.INPUT.MASK_FORMAT = mask_format
    return cfg


# ----------------------------------------------------------------------------------------
# json errors
# ----------------------------------------------------------------------------------------
def test_good_file_loads_like_register_coco_instances(tmp_path, register):
    json_file = _write(tmp_path, _base_json())
    register("_t_good", json_file, str(tmp_path))
    meta = MetadataCatalog.get("_t_good")
    assert (meta.json_file, meta.image_root, meta.evaluator_type) == (json_file, str(tmp_path), "coco")
    recs = DatasetCatalog.get("_t_good")
    assert [r["image_id"] for r in recs] == [1, 2]
    assert meta.thing_classes == ["a", "b"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}
    assert [a["category_id"] for r in recs for a in r["annotations"]] == [0, 1]
    assert recs[0]["file_name"] == os.path.join(str(tmp_path), "0.jpg")


def test_reregistering_replaces(tmp_path, register):
    json_file = _write(tmp_path, _base_json())
    register("_t_rereg", json_file, str(tmp_path))
    data = _base_json()
    data["images"] = data["images"][:1]
    data["annotations"] = data["annotations"][:1]
    other = _write(tmp_path, data, name="other.json")
    register("_t_rereg", other, str(tmp_path))
    assert MetadataCatalog.get("_t_rereg").json_file == other
    assert len(DatasetCatalog.get("_t_rereg")) == 1


def test_missing_json(tmp_path, register):
    missing = str(tmp_path / "nope.json")
    register("_t_missing", missing, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        DatasetCatalog.get("_t_missing")


def test_invalid_json(tmp_path, register):
    bad = _write(tmp_path, '{"images": [', name="broken.json")
    register("_t_invalid", bad, str(tmp_path))
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        DatasetCatalog.get("_t_invalid")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    data = _base_json()
    del data[key]
    path = _write(tmp_path, data)
    with pytest.raises(CocoFormatError, match=rf"ann\.json.*'{key}'"):
        load_coco_checked(path, str(tmp_path))


@pytest.mark.parametrize("key", ["image_id", "category_id", "bbox", "id"])
def test_annotation_missing_key(tmp_path, key):
    data = _base_json()
    del data["annotations"][1][key]
    path = _write(tmp_path, data)
    ident = "id=2" if key != "id" else "index 1"
    with pytest.raises(CocoFormatError, match=rf"ann\.json.*annotation with {ident} lacks.*'{key}'"):
        load_coco_checked(path, str(tmp_path))


@pytest.mark.parametrize("key", ["file_name", "height", "width"])
def test_image_missing_key(tmp_path, key):
    data = _base_json()
    del data["images"][0][key]
    path = _write(tmp_path, data)
    with pytest.raises(CocoFormatError, match=rf"image with id=1 lacks.*'{key}'"):
        load_coco_checked(path, str(tmp_path))


def test_other_structural_errors(tmp_path):
    cases = {
        "unknown category": (lambda d: d["annotations"][0].update(category_id=9),
                             r"annotation id=1 has category_id=9"),
        "bad bbox": (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"annotation id=2 has bbox"),
        "duplicate image": (lambda d: d["images"][1].update(id=1), r"image ids are not unique"),
        "bad size": (lambda d: d["images"][0].update(height=0), r"image id=1 has invalid height"),
        "list top": (lambda d: None, r"top level is a list"),
    }
    for what, (edit, pattern) in cases.items():
        data = _base_json()
        edit(data)
        if what == "list top":
            data = [data]
        path = _write(tmp_path, data)
        with pytest.raises(CocoFormatError, match=pattern):
            load_coco_checked(path, str(tmp_path))


# ----------------------------------------------------------------------------------------
# dropped annotations
# ----------------------------------------------------------------------------------------
def _bad_annotations_json():
    """Image 1: one good instance + 6 broken ones; image 2: only broken ones; image 3: none."""
    data = _base_json(3)
    data["annotations"] = data["annotations"][:1]
    rle_wrong_size = mask_util.encode(np.asfortranarray(np.ones((8, 8), np.uint8)))
    rle_wrong_size["counts"] = rle_wrong_size["counts"].decode()
    empty_rle = mask_util.encode(np.asfortranarray(np.zeros((SIZE, SIZE), np.uint8)))
    empty_rle["counts"] = empty_rle["counts"].decode()
    bad = [
        (1, {"bbox": [5, 5, 0, 10], "segmentation": [square_polygon(5, 5, 10)]}),   # zero width
        (1, {"bbox": [5, 5, 10, -3], "segmentation": [square_polygon(5, 5, 10)]}),  # negative height
        (1, {"bbox": [5, 5, 10, 10], "segmentation": []}),                   # empty polygon list
        (1, {"bbox": [5, 5, 10, 10], "segmentation": [[1, 2, 3, 4]]}),       # < 3 points
        (2, {"bbox": [5, 5, 10, 10], "segmentation": [[1, 2, 3, 4, 5]]}),    # odd length
        (2, {"bbox": [5, 5, 10, 10], "segmentation": rle_wrong_size}),
        (2, {"bbox": [5, 5, 10, 10], "segmentation": empty_rle}),
        (2, {"bbox": [5, 5, 10, 10]}),                                       # no mask at all
        (7, {"bbox": [5, 5, 10, 10], "segmentation": [square_polygon(5, 5, 10)]}),  # unknown image
    ]
    for n, (image_id, fields) in enumerate(bad):
        data["annotations"].append(
            {"id": 100 + n, "image_id": image_id, "category_id": 2, "iscrowd": 0, **fields}
        )
    # a multi-part polygon with one invalid part keeps its valid part
    data["annotations"].append(
        {"id": 200, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [40, 40, 10, 10],
         "segmentation": [[1, 2, 3, 4], square_polygon(40, 40, 10)]}
    )
    return data


def test_degenerate_annotations_are_dropped_with_warning(tmp_path, caplog):
    path = _write(tmp_path, _bad_annotations_json(), n_images=3)
    with caplog.at_level(logging.WARNING, logger="d2seg.data.coco"):
        recs = load_coco_checked(path, str(tmp_path))
    assert len(caplog.records) == 1  # one summary line
    msg = caplog.records[0].getMessage()
    assert "3 images, 11 annotations, 2 kept; dropped 9 of 11 annotations" in msg
    assert "2 x box with zero or negative width/height" in msg
    assert "3 x empty or invalid polygon (fewer than 3 points)" in msg
    assert "no segmentation in a data set with masks" in msg
    assert "changed 1 (1 x invalid polygon part removed (the rest kept))" in msg
    assert recs.load_summary.num_kept == 2 and recs.load_summary.annotations_differ
    assert [len(r["annotations"]) for r in recs] == [2, 0, 0]
    kept = recs[0]["annotations"][1]
    assert kept["segmentation"] == [square_polygon(40, 40, 10)]


def test_uncompressed_rle_is_compressed(tmp_path):
    data = _base_json(1)
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[10:20, 5:30] = 1
    counts, prev, run = [], 0, 0
    for v in m.flatten(order="F"):  # uncompressed COCO RLE: runs alternating 0/1
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    data["annotations"][0]["segmentation"] = {"size": [SIZE, SIZE], "counts": counts}
    data["annotations"][0]["iscrowd"] = 1
    recs = load_coco_checked(_write(tmp_path, data, 1), str(tmp_path))
    segm = recs[0]["annotations"][0]["segmentation"]
    assert isinstance(segm["counts"], str)
    assert (mask_util.decode(segm) == m).all()


def test_bad_annotations_train_a_mask_rcnn_step(tmp_path, register):
    """Through the real train loader (empty-image filtering on) and a Mask R-CNN step:
    losses are finite, nothing crashes."""
    path = _write(tmp_path, _bad_annotations_json(), n_images=3)
    register("_t_bad_train", path, str(tmp_path))
    cfg = _cfg()
    cfg.DATASETS.TRAIN = ("_t_bad_train",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    loader = build_detection_train_loader(cfg, mapper=D2SegDatasetMapper(cfg, is_train=True))
    batch = next(iter(loader))
    # image 2 lost all its annotations and image 3 had none: both filtered from training
    assert {b["image_id"] for b in batch} == {1}
    assert all(len(b["instances"]) == 2 for b in batch)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


# ----------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------
def _record(tmp_path, file_name, annotations=None, image_id=3):
    return {"file_name": str(tmp_path / file_name), "height": SIZE, "width": SIZE,
            "image_id": image_id, "annotations": annotations or []}


def test_missing_image_file(tmp_path):
    mapper = D2SegDatasetMapper(_cfg(), is_train=True)
    with pytest.raises(ImageReadError, match=r"cannot read image '.*gone\.jpg' \(dataset record image_id=3\): file does not exist"):
        mapper(_record(tmp_path, "gone.jpg"))


def test_corrupt_image_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg" * 10)
    mapper = D2SegDatasetMapper(_cfg(), is_train=False)
    with pytest.raises(ValueError, match=r"cannot read image '.*bad\.jpg' \(dataset record image_id=3\)"):
        mapper(_record(tmp_path, "bad.jpg"))


def test_truncated_image_file(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    mapper = D2SegDatasetMapper(_cfg(), is_train=True)
    with pytest.raises(ImageReadError, match=r"cut\.jpg.*image_id=3.*truncated"):
        mapper(_record(tmp_path, "cut.jpg"))


def test_size_mismatch_keeps_detectron2_error(tmp_path):
    cv2.imwrite(str(tmp_path / "small.jpg"), np.zeros((32, 48, 3), np.uint8))
    mapper = D2SegDatasetMapper(_cfg(), is_train=True)
    with pytest.raises(SizeMismatchError, match=r"small\.jpg.*\(48, 32\).*\(64, 64\)"):
        mapper(_record(tmp_path, "small.jpg"))


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_zero_instance_image_through_mapper(tmp_path, mask_format):
    cv2.imwrite(str(tmp_path / "empty.jpg"), np.full((SIZE, SIZE, 3), 128, np.uint8))
    cfg = _cfg(mask_format)
    out = D2SegDatasetMapper(cfg, is_train=True)(_record(tmp_path, "empty.jpg"))
    inst = out["instances"]
    assert len(inst) == 0 and inst.image_size == (SIZE, SIZE)
    assert inst.gt_boxes.tensor.shape == (0, 4) and inst.gt_classes.shape == (0,)
    masks_type = BitMasks if mask_format == "bitmask" else PolygonMasks
    assert isinstance(inst.gt_masks, masks_type) and len(inst.gt_masks) == 0
    if mask_format == "bitmask":
        assert inst.gt_masks.tensor.shape == (0, SIZE, SIZE)

    test_out = D2SegDatasetMapper(cfg, is_train=False)(_record(tmp_path, "empty.jpg"))
    assert test_out["image"].shape == (3, SIZE, SIZE) and "instances" not in test_out
    assert "annotations" not in test_out

    if mask_format != "bitmask":
        return
    # and Mask R-CNN trains on it (zero ground truth: only background targets)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model([out])
    assert all(torch.isfinite(v) for v in losses.values())


def test_same_output_as_detectron2_mapper_on_good_records(tmp_path):
    from detectron2.data import DatasetMapper

    path = _write(tmp_path, _base_json())
    recs = load_coco_checked(path, str(tmp_path))
    cfg = _cfg()
    cfg.INPUT.RANDOM_FLIP = "none"
    ours, theirs = D2SegDatasetMapper(cfg, is_train=True), DatasetMapper(cfg, is_train=True)
    for rec in recs:
        a, b = ours(rec), theirs(rec)
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
        assert torch.equal(a["instances"].gt_masks.tensor, b["instances"].gt_masks.tensor)
        assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)


def test_rle_masks_with_polygon_format_say_what_to_change(tmp_path):
    data = _base_json(1)
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[5:25, 5:25] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    data["annotations"][0]["segmentation"] = rle
    rec = load_coco_checked(_write(tmp_path, data, 1), str(tmp_path))[0]
    with pytest.raises(ValueError, match=r"0\.jpg.*image_id=1.*MASK_FORMAT to 'bitmask'"):
        D2SegDatasetMapper(_cfg("polygon"), is_train=True)(rec)
    out = D2SegDatasetMapper(_cfg("bitmask"), is_train=True)(rec)
    assert int(out["instances"].gt_masks.tensor.sum()) == 400
