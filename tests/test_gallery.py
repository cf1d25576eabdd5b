"""tools/gallery.py: the matching that counts what a model got right (by hand), and the tool
end to end on freshly initialised models (real checkpoint files, real shapes data)."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import d2seg  # noqa: F401
from detectron2.structures import BoxMode, Boxes, Instances
from d2seg.engine import Trainer, setup_cfg

from conftest import REPO, load_script

tool = load_script("tools/gallery.py")


def test_greedy_matching_counts_right_wrong_missed_and_duplicates():
    gt_classes = np.array([1, 2])
    # prediction 0 finds object 0; prediction 1 overlaps object 0 more, but it is taken, so
    # it finds object 1 (IoU 0.6); prediction 2 overlaps nothing
    iou = np.array([[0.9, 0.0], [0.8, 0.6], [0.1, 0.2]])
    assert tool.count_matches([0.9, 0.8, 0.7], [1, 2, 1], iou, gt_classes) == (2, 0, 0, 1)
    # the same with the second prediction of the wrong class
    assert tool.count_matches([0.9, 0.8, 0.7], [1, 0, 1], iou, gt_classes) == (1, 1, 0, 1)
    # a duplicate of object 0 (below the IoU bar for object 1): unmatched, object 1 missed
    iou_dup = np.array([[0.9, 0.0], [0.8, 0.4]])
    assert tool.count_matches([0.9, 0.8], [1, 2], iou_dup, gt_classes) == (1, 0, 1, 1)
    # the higher score claims the object first, whatever the order of the rows
    assert tool.count_matches([0.5, 0.9], [2, 1], np.array([[0.7, 0.0], [0.6, 0.0]]), gt_classes) == (1, 0, 1, 1)
    # no predictions, and no objects
    assert tool.count_matches([], [], np.zeros((0, 2)), gt_classes) == (0, 0, 2, 0)
    assert tool.count_matches([0.9], [1], np.zeros((1, 0)), np.zeros(0, dtype=int)) == (0, 0, 0, 1)


def test_f1_and_ious():
    assert tool.f1([4, 2, 1, 1, 1]) == 2 * 2 / (4 + 4)
    assert tool.f1([3, 0, 0, 3, 0]) == 0.0
    a = np.zeros((1, 4, 4), dtype=bool)
    a[0, :2, :2] = True
    b = np.zeros((2, 4, 4), dtype=bool)
    b[0, :2, :] = True  # contains a: IoU 4 / 8
    b[1, 2:, 2:] = True  # disjoint
    np.testing.assert_allclose(tool._iou_matrix(a, b), [[0.5, 0.0]])
    assert tool._iou_matrix(np.zeros((0, 4, 4), dtype=bool), b).shape == (0, 2)
    np.testing.assert_allclose(tool._box_iou(np.array([[0.0, 0, 2, 2]]), np.array([[0.0, 0, 2, 4], [5, 5, 6, 6]])),
                               [[0.5, 0.0]])


def _record(with_masks):
    """A Detectron2 record of a 40 x 60 image with two rectangles (class 1 at x 10-30, y 5-25;
    class 3 at x 35-55, y 10-30), with or without polygons."""
    anns = []
    for cls, (x0, y0, x1, y1) in ((1, (10, 5, 30, 25)), (3, (35, 10, 55, 30))):
        a = {"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": cls}
        if with_masks:
            a["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        anns.append(a)
    return {"height": 40, "width": 60, "annotations": anns}


def _prediction(boxes, classes, scores):
    """A mask model's output on that image: filled boxes as masks."""
    inst = Instances((40, 60))
    masks = torch.zeros(len(boxes), 40, 60, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    inst.pred_masks = masks
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.pred_classes = torch.tensor(classes)
    inst.scores = torch.tensor(scores)
    return {"instances": inst}


def test_box_only_ground_truth_is_matched_by_box_iou():
    """A mask prediction on ground truth without masks is matched by box IoU (and the row
    says so), not counted as missed; with masks, mask IoU is used."""
    # the first object found with its class, the second with a wrong class, one false positive
    pred = _prediction([(10, 5, 30, 25), (36, 10, 55, 30), (0, 32, 8, 40)], [1, 2, 4], [0.9, 0.8, 0.7])
    box_only = tool._gt_of(_record(with_masks=False))
    assert box_only[2] is None and box_only[0].tolist() == [1, 3]
    counts, used = tool._count_at([(box_only, pred)], 0.5, 0.5)
    assert counts.tolist() == [2, 1, 1, 0, 1] and used == "box"
    with_masks = tool._gt_of(_record(with_masks=True))
    assert with_masks[2].shape == (2, 40, 60)
    counts, used = tool._count_at([(with_masks, pred)], 0.5, 0.5)
    assert counts.tolist() == [2, 1, 1, 0, 1] and used == "mask"
    # both kinds of images together; a score threshold that drops the second prediction
    counts, used = tool._count_at([(box_only, pred), (with_masks, pred)], 0.85, 0.5)
    assert counts.tolist() == [4, 2, 0, 2, 0] and used == "mask, box"


def _init_checkpoint(config, path):
    torch.manual_seed(0)
    model = Trainer.build_model(setup_cfg(config, ["MODEL.DEVICE", "cpu"]))
    torch.save({"model": model.state_dict()}, path)


def test_tool_end_to_end_on_initialised_models(tmp_path, capsys):
    # the instance model's config asks for 64 px shapes: the gallery must prepare its data as
    # the Trainer does (D2SEG.SHAPES), not use the data sets registered at import (128 px)
    inst = tmp_path / "fcos_R18_shapes.yaml"
    inst.write_text(f"_BASE_: {os.path.join(REPO, 'configs', 'FCOS', 'fcos_R18_shapes.yaml')}\n"
                    "D2SEG:\n  SHAPES:\n    IMAGE_SIZE: 64\n    NUM_VAL: 3\n"
                    "INPUT:\n  MIN_SIZE_TEST: 64\n  MAX_SIZE_TEST: 64\n")
    inst = str(inst)
    sem = os.path.join(REPO, "configs", "quick", "semantic_fpn_shapes.yaml")
    _init_checkpoint(inst, tmp_path / "inst.pth")
    _init_checkpoint(sem, tmp_path / "sem.pth")
    out = tmp_path / "gallery"
    rc = tool.main(["--model", inst, str(tmp_path / "inst.pth"), "--model", sem, str(tmp_path / "sem.pth"),
                    "--num", "2", "--threshold", "0.05", "--scale", "1", "--output", str(out)])
    assert rc == 0
    # two pictures in a row of three columns: 64 px shapes (the config's), 128 px (the default)
    assert Image.open(out / "fcos_R18_shapes.jpg").size == (3 * 64, 64)
    assert Image.open(out / "semantic_fpn_shapes.jpg").size == (3 * 128, 128)
    rows = (out / "gallery_rows.md").read_text().splitlines()
    assert rows[0].startswith("| config | threshold | objects |") and len(rows) == 4
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[1] == "0.05"
    objects, right, wrong, missed, unmatched = (int(c) for c in cells[2:7])
    assert objects > 0 and right + wrong + missed == objects and unmatched >= 0
    assert cells[7] == "box"  # FCOS predicts no masks
    assert "pixel accuracy" in rows[3]
    assert rows[2] in capsys.readouterr().out
    # the process is left as it was: the rest of the suite trains in it, and reads d2seg's logs
    assert torch.is_grad_enabled()
    assert logging.getLogger("d2seg").propagate


def test_tool_names_a_missing_weights_file(tmp_path, capsys):
    config = os.path.join(REPO, "configs", "FCOS", "fcos_R18_shapes.yaml")
    assert tool.main(["--model", config, str(tmp_path / "nope.pth"), "--output", str(tmp_path)]) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_images_are_read_as_training_reads_them(tmp_path, monkeypatch):
    """A 16-bit grayscale image of the test set reaches the model scaled to 8 bits, as in
    training, evaluation and the demo (Detectron2's read_image saturated it to white)."""
    import json
    from types import SimpleNamespace

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2seg.data import register_coco_dataset

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "deep.png", "height": 64, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 20, 20], "iscrowd": 0,
                         "area": 400, "segmentation": [[8, 8, 28, 8, 28, 28, 8, 28]]}],
        "categories": [{"id": 1, "name": "thing"}]}))
    register_coco_dataset("_gallery_deep", tmp_path / "ann.json", tmp_path)
    config = tmp_path / "deep.yaml"
    config.write_text(f"_BASE_: {os.path.join(REPO, 'configs', 'FCOS', 'fcos_R18_shapes.yaml')}\n"
                      "DATASETS:\n  TEST: ('_gallery_deep',)\n")

    class Seen(Exception):
        pass

    def predictor(image):
        raise Seen(image)

    monkeypatch.setattr(tool.demo, "build_predictor", lambda cfg, weights: predictor)
    try:
        with pytest.raises(Seen) as seen:
            tool.run_model(str(config), "unused.pth", SimpleNamespace(device="cpu", num=1),
                           logging.getLogger("test"))
    finally:
        DatasetCatalog.remove("_gallery_deep")
        MetadataCatalog.remove("_gallery_deep")
    image = seen.value.args[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.abs(image[0, :, 0].astype(float) - ramp[0] * 255.0 / 65535).max() <= 1
