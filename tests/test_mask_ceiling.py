"""dev/diagnose/mask_ceiling.py on a tiny COCO-format data set written by the test (3 images
of 64 px with rectangles, discs and small triangles): the oracle of the GT masks scores AP 100
through Detectron2's COCOEvaluator, coarser representations lose IoU in the expected order,
Mask R-CNN's 28x28 target is near-exact on a large axis-aligned rectangle, and MEInst's
encoding learnt from the set's own masks reconstructs them."""
import json
import math
import uuid

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from conftest import load_script

tool = load_script("dev/diagnose/mask_ceiling.py")
SIZE = 64


def _rect(x0, y0, x1, y1):
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _disc(cx, cy, r):
    m = np.zeros((SIZE, SIZE), np.uint8)
    cv2.circle(m, (cx, cy), r, 1, -1)
    return m


def _triangle(pts):
    m = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(m, [np.asarray(pts, np.int32)], 1)
    return m


IMAGES = [
    [(1, _rect(6, 8, 52, 50)), (2, _disc(56, 56, 5))],
    [(2, _disc(22, 24, 14)), (3, _triangle([(40, 40), (52, 44), (44, 54)])), (2, _disc(50, 12, 4))],
    [(1, _rect(30, 4, 41, 15)), (3, _triangle([(4, 40), (30, 58), (8, 60)])), (2, _disc(46, 44, 9))],
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A registered COCO-format data set (json only: the oracle never reads the images)."""
    folder = tmp_path_factory.mktemp("mask_ceiling")
    images, annotations = [], []
    for i, objects in enumerate(IMAGES):
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": SIZE, "width": SIZE})
        for cat, m in objects:
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "segmentation": rle, "area": int(m.sum()),
                                "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": 0})
    cats = [{"id": k, "name": n} for k, n in ((1, "rect"), (2, "disc"), (3, "triangle"))]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    name = f"mask_ceiling_test_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(path), str(folder))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _own_encoding(dataset, n):
    from d2seg.meinst import learn_encoding

    return learn_encoding(DatasetCatalog.get(dataset), mask_size=28, num_components=n)


def test_identity_is_ap_100_and_coarser_maps_lose_iou(dataset, tmp_path):
    reps = tool.make_representations(["identity", "stride4", "stride8", "stride8_fit"])
    res = tool.evaluate(dataset, reps)
    assert res["identity"]["instances"] == 8 and res["identity"]["small_instances"] == 7
    for k in tool.METRICS:
        assert res["identity"][k] == pytest.approx(100.0), (k, res["identity"])
    assert res["identity"]["mIoU"] == 1.0 and res["identity"]["empty"] == 0
    # resolution order; the 4-5 px discs vanish from the stride-8 area average
    assert res["stride8"]["mIoU"] < res["stride4"]["mIoU"] - 0.05
    assert res["stride4"]["mIoU"] < res["identity"]["mIoU"]
    assert res["stride8"]["mIoU_small"] < res["stride8"]["mIoU"]
    assert res["stride8"]["AP"] < res["stride4"]["AP"] < 100.0
    assert res["stride8"]["empty"] >= 1
    # a fitted stride-8 logit map does better than the area average, through the same path
    assert res["stride8_fit"]["mIoU"] > res["stride8"]["mIoU"] + 0.05
    assert res["stride8_fit"]["empty"] < res["stride8"]["empty"]


def test_roi28_is_near_exact_on_a_large_rectangle():
    m = torch.from_numpy(_rect(6, 8, 52, 50)).bool()[None]
    box = torch.tensor([[6.0, 8.0, 52.0, 50.0]])
    rec = tool.roi_mask(m, box)
    assert rec.shape == m.shape
    assert tool.mask_ious(rec, m).item() > 0.99
    # a 28x28 crop of a small disc is not exact, and the dense stride-8 map is worse
    d = torch.from_numpy(_disc(30, 30, 5)).bool()[None]
    dbox = torch.tensor([[25.0, 25.0, 36.0, 36.0]])
    assert tool.mask_ious(tool.roi_mask(d, dbox), d).item() > tool.mask_ious(tool.dense_mask(d, dbox, 8), d).item()


def test_meinst_with_its_own_basis_reconstructs(dataset):
    full = tool.make_representations(["roi28", "meinst"], _own_encoding(dataset, 7))
    poor = tool.make_representations(["meinst"], _own_encoding(dataset, 1))
    res = tool.evaluate(dataset, full)
    worse = tool.evaluate(dataset, poor)["meinst"]
    # 8 masks span at most 7 directions around their mean: nothing is lost in the code
    assert res["meinst"]["mIoU"] > res["roi28"]["mIoU"] - 0.01
    assert res["meinst"]["mIoU"] > 0.9
    assert worse["mIoU"] < res["meinst"]["mIoU"] - 0.05


def test_blendmask_crop_and_cli_json(dataset, tmp_path, capsys):
    res = tool.main(["--dataset", dataset, "--representations", "identity", "blendmask",
                     "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| identity | 100.0 | 100.0 | 100.0 |" in out and "| blendmask |" in out
    saved = json.loads((tmp_path / "mask_ceiling.json").read_text())
    assert set(saved["results"]) == {"identity", "blendmask"}
    bm = saved["results"]["blendmask"]
    assert 0.5 < bm["mIoU"] < 1.0 and bm["AP"] == pytest.approx(res["blendmask"]["AP"])
    assert math.isfinite(bm["AP50"])


def test_a_subset_of_images_is_evaluated_alone(dataset):
    res = tool.evaluate(dataset, tool.make_representations(["identity"]), max_images=1)["identity"]
    assert res["instances"] == 2 and res["AP"] == pytest.approx(100.0)  # not diluted by unseen GT


def test_unknown_representation_is_named():
    with pytest.raises(ValueError, match="stride2"):
        tool.make_representations(["identity", "stride2"])
