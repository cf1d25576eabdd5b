"""dev/diagnose/positives.py on hand-made inputs: the positives it counts per object are those
that SOLO's grid rule (centre region of sigma 0.2 on each level's grid), FCOS's central
sampling with size ranges, and the RPN's IoU matching give by hand for squares of known size
at known places; the areas of the data path follow the records' annotations."""
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances

from conftest import CONFIGS, load_script

tool = load_script("dev/diagnose/positives.py")
SIZE = 128


def _cfg(name, *opts):
    from d2seg.engine import setup_cfg

    return setup_cfg(os.path.join(CONFIGS, name), list(opts), follow_dataset_classes=False)


def _model(name, *opts):
    torch.manual_seed(0)
    return build_model(_cfg(name, *opts))


def _input(squares):
    """One 128 px input with the given squares (x0, y0, side), class 0..: pixels
    [x0, x0 + side) x [y0, y0 + side), box (x0, y0, x0 + side, y0 + side)."""
    masks = torch.zeros((len(squares), SIZE, SIZE), dtype=torch.bool)
    boxes = []
    for i, (x0, y0, s) in enumerate(squares):
        masks[i, y0:y0 + s, x0:x0 + s] = True
        boxes.append([x0, y0, x0 + s, y0 + s])
    inst = Instances((SIZE, SIZE))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.arange(len(squares)) % 5
    inst.gt_masks = BitMasks(masks)
    return {"image": torch.zeros((3, SIZE, SIZE), dtype=torch.uint8), "instances": inst,
            "height": SIZE, "width": SIZE}


# SOLO (grids 20/16/12/8/6 over 128 px, ranges [1,24] [12,48] [24,96] ..., sigma 0.2):
# * a 20 px square at 40: centre of mass 50, half-region 0.5 * 0.2 * 20 = 2 px; levels 0 and 1
#   (20 in [1,24] and [12,48]); grid 20 (6.4 px cells): 48 -> 7, 52 -> 8: 2 x 2 cells; grid 16
#   (8 px cells): 48, 50, 52 -> 6: 1 cell.
# * a 40 px square at 64: centre 84, half-region 4 px; levels 1 and 2; grid 16: 80 -> 10,
#   88 -> 11: 2 x 2; grid 12 (10.67 px): 80 -> 7, 88 -> 8: 2 x 2.
SOLO_SQUARES = [(40, 40, 20), (64, 64, 40)]
SOLO_EXPECTED = [[4, 1, 0, 0, 0], [0, 4, 4, 0, 0]]


@pytest.mark.parametrize("config", ["SOLO/solo_shapes.yaml", "SOLO/solov2_shapes.yaml"])
def test_solo_counts_match_the_grid_rule(config):
    model = _model(config)
    assert tool.method_family(model) == "solo"
    counts = tool.count_positives(model, [_input(SOLO_SQUARES)])
    assert list(counts) == [""]
    (c,) = counts[""]
    assert c.tolist() == SOLO_EXPECTED
    assert len(tool.level_names(model)[""]) == 5
    assert tool.level_names(model)[""][0].startswith("p2 S=20")


def test_solo_counts_smaller_wins_a_shared_cell():
    # Two concentric squares, 24 px at 38 and 20 px at 40 (centre 50 for both). SOLO gives a
    # shared cell to the smaller instance. The 20 px one as alone: grid 20 cells 7-8 (2 x 2),
    # grid 16 cell 6. The 24 px one (half-region 2.4 px: 47.6 to 52.4; levels [12,48] and
    # [24,96]): grid 16: 47.6 -> 5, 52.4 -> 6: 2 x 2 cells, of which (6, 6) goes to the smaller
    # one: 3; grid 12 (10.67 px cells): 47.6 and 52.4 -> 4: 1 cell.
    model = _model("SOLO/solo_shapes.yaml")
    (c,) = tool.count_positives(model, [_input([(38, 38, 24), (40, 40, 20)])])[""]
    assert c[1].tolist() == [4, 1, 0, 0, 0]  # the smaller one, as alone
    assert c[0].tolist() == [0, 3, 1, 0, 0]  # the larger one lost the cell it shares


# FCOS (P3-P7, strides 8..128, locations at s/2 + k s, size ranges [-1,32] [32,64] ..., central
# sampling radius 1.5 strides, clipped to the box, strictly inside):
# * box (8, 8, 28, 28), centre 18: P3 square [6, 30] -> [8, 28]: x, y in {12, 20}: 4 locations,
#   max(l, t, r, b) <= 16 -> P3. P4 (8 + 16k): 24 only, max 16 < 32: none.
# * box (64, 64, 112, 112), centre 88: P3 square [76, 100]: x, y in {84, 92}, max <= 28: 4.
#   P4 square [64, 112]: x, y in {72, 88, 104}: 9 candidates, all but (88, 88) (max 24) have
#   max 40 in [32, 64]: 8. P5 (16 + 32k): (80, 80) has max 32 < 64: none.
FCOS_SQUARES = [(8, 8, 20), (64, 64, 48)]
FCOS_EXPECTED = [[4, 0, 0, 0, 0], [4, 8, 0, 0, 0]]


def test_fcos_counts_match_central_sampling_and_size_ranges():
    model = _model("FCOS/fcos_R18_shapes.yaml")
    assert tool.method_family(model) == "fcos"
    (c,) = tool.count_positives(model, [_input(FCOS_SQUARES)])[""]
    assert c.tolist() == FCOS_EXPECTED
    names = tool.level_names(model)[""]
    assert names[0] == "p3 s=8 [0,32]" and names[1] == "p4 s=16 [32,64]"


def test_condinst_goes_through_its_mask_head_targets():
    # CondInst's shapes config samples around the box centres (MASK_CENTER_SAMPLING False):
    # FCOS's counts. With MODEL.CONDINST.MASK_CENTER_SAMPLING its prepare_targets sets
    # gt_centers to the masks' centres of mass (pixel i at i). A mask that is only the left
    # strip x in [64, 70) of the box (64, 64, 112, 112) has its centre at (66.5, 87.5): P3
    # square x in [64, 78.5] -> {68, 76}, all with r >= 36 > 32: none; P4 x in [64, 90.5] ->
    # {72, 88}, y in {72, 88, 104}: 6 candidates, (88, 88) has max 24 < 32: 5. On the box
    # centre the same box gets 4 + 8.
    x = _input([(64, 64, 48)])
    x["instances"].gt_masks.tensor[0, :, 70:] = False
    model = _model("CondInst/condinst_R18_shapes.yaml")
    (c,) = tool.count_positives(model, [_input(FCOS_SQUARES)])[""]
    assert c.tolist() == FCOS_EXPECTED
    (c,) = tool.count_positives(model, [x])[""]
    assert c.tolist() == [[4, 8, 0, 0, 0]]
    model = _model("CondInst/condinst_R18_shapes.yaml", "MODEL.CONDINST.MASK_CENTER_SAMPLING", "True")
    (c,) = tool.count_positives(model, [x])[""]
    assert c.tolist() == [[0, 5, 0, 0, 0]]


def test_rpn_counts_one_anchor_for_a_box_equal_to_an_anchor():
    # Anchor generator: sizes 8/16/32/64/128 on p2-p6 (strides 4..64), ratios 0.5/1/2, centred
    # at k * stride. The box (32, 32, 48, 48) IS the 16 px square anchor of p3 at (40, 40):
    # IoU 1; its neighbours on p3 reach 0.33, the 0.5/2 ratio anchors 0.55, other levels 0.25:
    # exactly one positive (>= 0.7), on p3.
    model = _model("quick/mask_rcnn_shapes.yaml")
    assert tool.method_family(model) == "rcnn"
    x = _input([(32, 32, 16)])
    counts = tool.count_positives(model, [x])
    assert set(counts) == {"RPN anchors", "ROI fg proposals"}
    (rpn,) = counts["RPN anchors"]
    assert rpn.tolist() == [[0, 1, 0, 0, 0]]
    assert tool.level_names(model)["RPN anchors"][1] == "p3"
    (roi,) = counts["ROI fg proposals"]
    # the GT box is appended to the proposals: at least one foreground; at most the
    # foreground quota of the 128 sampled proposals (0.25)
    assert 1 <= int(roi[0, 0]) <= 32


def test_rpn_counts_every_object_of_two():
    model = _model("quick/mask_rcnn_shapes.yaml")
    (rpn,) = tool.count_positives(model, [_input([(32, 32, 16), (80, 16, 32)])])["RPN anchors"]
    # the 32 px square (80, 16, 112, 48) is p4's anchor centred at (96, 32): one positive on p4
    assert rpn.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]


def test_unsupported_model_is_refused():
    with pytest.raises(ValueError, match="META_ARCHITECTURE"):
        tool.method_family(torch.nn.Linear(1, 1))


def test_summary_statistics_and_groups():
    s = tool.summarize([0, 1, 2, 5])
    assert s["objects"] == 4 and s["mean"] == 2.0 and s["median"] == 1.5
    assert s["frac_0"] == 0.25 and s["frac_le2"] == 0.75 and (s["min"], s["max"]) == (0, 5)
    assert tool.area_group(32 ** 2 - 1) == "small" and tool.area_group(32 ** 2) == "medium"
    assert tool.area_group(96 ** 2) == "large"
    objects = [
        {"positives": 3, "per_level": [3, 0], "area_group": "small"},
        {"positives": 0, "per_level": [0, 0], "area_group": "small"},
        {"positives": 6, "per_level": [2, 4], "area_group": "medium"},
    ]
    summary = tool.summarize_objects(objects, ["a", "b"])
    assert summary["groups"]["small"]["mean"] == 1.5 and summary["groups"]["medium"]["mean"] == 6
    assert "large" not in summary["groups"]
    a, b = summary["levels"]
    assert a["frac_objects"] == pytest.approx(2 / 3) and a["mean_positives_there"] == 2.5
    assert a["frac_small_objects"] == 0.5 and b["frac_small_objects"] == 0.0
    assert summary["levels_per_object"] == {0: pytest.approx(1 / 3), 1: pytest.approx(1 / 3),
                                            2: pytest.approx(1 / 3)}
    text = tool.markdown({"m": {"summary": summary}})
    assert "| m (small) | 2 | 1.50 | 1.5 | 50.0% | 50.0% | 0-3 |" in text


def test_mapper_areas_follow_the_annotations(tmp_path):
    from d2seg.data.mapper import D2SegDatasetMapper

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(img)
    masks = []
    for x0, y0, s in [(10, 10, 20), (60, 50, 40)]:
        m = np.zeros((SIZE, SIZE), np.uint8, order="F")
        m[y0:y0 + s, x0:x0 + s] = 1
        m[y0, x0] = 0  # areas differ from the box areas
        masks.append(m)
    annos = []
    for m in masks:
        rle = mask_util.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        x, y, w, h = mask_util.toBbox(rle).tolist()
        annos.append({"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1,
                      "segmentation": rle, "iscrowd": 0})
    record = {"file_name": str(img), "height": SIZE, "width": SIZE, "image_id": 7,
              "annotations": annos}
    cfg = _cfg("SOLO/solo_shapes.yaml", "INPUT.RANDOM_FLIP", "none")
    out = tool.MapperWithAreas(D2SegDatasetMapper(cfg, is_train=True))(record)
    assert out["gt_areas"].tolist() == [399.0, 1599.0]
    assert out["instances"].gt_masks.tensor.flatten(1).sum(1).tolist() == [399, 1599]
    record["annotations"].append({**annos[0], "iscrowd": 1})
    out = tool.MapperWithAreas(D2SegDatasetMapper(cfg, is_train=True))(record)
    assert len(out["gt_areas"]) == len(out["instances"]) == 2


# --classify: the trained classifier's scores at each object's own positives.

def _dominant(model, layer, cls, high=5.0):
    """Class ``cls`` scores sigmoid(high) everywhere, every other class sigmoid(-high)."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(-high)
        layer.bias[cls] = high
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", ["FCOS/fcos_R18_shapes.yaml", "CondInst/condinst_R18_shapes.yaml"])
def test_classify_fcos_reads_the_dominant_class_at_its_positives(config):
    model = _model(config)
    _dominant(model, model.proposal_generator.fcos_head.cls_logits, 2)
    x = _input(FCOS_SQUARES)
    x["instances"].gt_classes = torch.tensor([2, 0])
    before = _state(model)
    (objs,) = tool.scores_at_positives(model, [x])
    # eval mode afterwards (FCOS's own flag included) and no weight or buffer changed
    assert not any(m.training for m in model.modules())
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [len(o["scores"]) for o in objs] == [4, 12]  # FCOS_EXPECTED's totals
    assert objs[1]["levels"].tolist().count(1) == 8
    hi, lo = torch.sigmoid(torch.tensor(5.0)), torch.sigmoid(torch.tensor(-5.0))
    for o in objs:
        assert torch.allclose(o["scores"][:, 2], hi.expand(len(o["scores"])))
        assert torch.allclose(o["scores"][:, [0, 1, 3, 4]], lo.expand(len(o["scores"]), 4))
        assert o["after_point_nms"] is None
    s = tool.classification_summary([{**o, "area_group": "small"} for o in objs], 5)
    assert s["positives"] == 16 and s["objects_without_positives"] == 0
    assert s["accuracy_at_positives"] == pytest.approx(4 / 16)  # the class-2 object's 4 only
    assert s["object_accuracy"] == 0.5
    assert s["mean_max_score"] == pytest.approx(float(hi))
    assert s["mean_gt_score"] == pytest.approx((4 * float(hi) + 12 * float(lo)) / 16)
    assert s["confusion"][2] == [0, 0, 1, 0, 0, 0] and s["confusion"][0] == [0, 0, 1, 0, 0, 0]
    assert s["mean_positives_above"] == 8.0 and s["frac_objects_2plus_above"] == 1.0


def test_classify_fcos_scores_are_those_of_the_eval_forward():
    # random classifier: every score returned at a positive is the eval-mode head's score at
    # some location of that image's maps (the training flag of FCOS changes no computation)
    model = _model("FCOS/fcos_R18_shapes.yaml")
    with torch.no_grad():
        torch.nn.init.normal_(model.proposal_generator.fcos_head.cls_logits.weight, std=0.5)
    x = _input(FCOS_SQUARES)
    (objs,) = tool.scores_at_positives(model, [x])
    with torch.no_grad():
        images = model.preprocess_image([x])
        feats = model.backbone(images.tensor)
        out = model.proposal_generator(images, feats)
    from d2seg.fcos.fcos import flatten_levels

    full = flatten_levels(out.logits)[0].sigmoid()  # (M, 5)
    for o in objs:
        d = (o["scores"][:, None, :] - full[None]).abs().amax(dim=2)  # (P, M)
        assert bool((d.min(dim=1).values < 1e-6).all())
    assert objs[0]["scores"].std(dim=0).max() > 1e-3  # not constant: the test can fail


def test_classify_solo_reads_the_dominant_class_at_its_cells():
    model = _model("SOLO/solo_shapes.yaml")
    _dominant(model, model.ins_head.cate_pred, 1)
    before = _state(model)
    (objs,) = tool.scores_at_positives(model, [_input(SOLO_SQUARES)])  # classes 0 and 1
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.training
    assert [len(o["scores"]) for o in objs] == [5, 8]  # SOLO_EXPECTED's totals
    assert objs[0]["levels"].tolist() == [0, 0, 0, 0, 1]
    s = tool.classification_summary([{**o, "area_group": "small"} for o in objs], 5)
    assert s["accuracy_at_positives"] == pytest.approx(8 / 13)
    assert s["object_accuracy"] == 0.5
    assert s["confusion"][0] == [0, 1, 0, 0, 0, 0] and s["confusion"][1] == [0, 1, 0, 0, 0, 0]
    # constant maps: every cell is a maximum of its 2x2 window, point NMS keeps them all
    assert s["mean_positives_above"] == 6.5 and s["mean_positives_above_after_point_nms"] == 6.5


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_classify_solo_reads_each_cell_and_its_point_nms(sign):
    # Category logits that encode the level and the cell: class 0 at (level l, row r, col c)
    # = sign * (1000 l + r S + c) / 1e4. A 20 px square at x 40, y 72 (centre 50, 82): grid
    # 20: cols 7-8 (48/6.4, 52/6.4), rows 12-13 (80/6.4, 84/6.4); grid 16: col 6, row 10. A
    # transposed read would give rows 7-8. Increasing codes: each cell is the maximum of its
    # up-left 2x2 window, point NMS keeps it; decreasing: suppressed (but not cell (0, 0)).
    model = _model("SOLO/solo_shapes.yaml")
    S = model.num_grids

    def predict(features, level_features):
        preds = []
        for lvl, s in enumerate(S):
            code = 1000 * lvl + torch.arange(s * s, dtype=torch.float32).view(s, s)
            p = torch.full((1, 5, s, s), -5.0)
            p[0, 0] = sign * code / 1e4
            preds.append(p)
        return preds, None

    model.predict = predict
    (obj,) = tool.scores_at_positives(model, [_input([(40, 72, 20)])])[0]
    codes = torch.round(sign * torch.logit(obj["scores"][:, 0].double()) * 1e4).long()
    assert sorted(codes.tolist()) == [12 * 20 + 7, 12 * 20 + 8, 13 * 20 + 7, 13 * 20 + 8,
                                      1000 + 10 * 16 + 6]
    kept = obj["after_point_nms"][:, 0]
    if sign > 0:
        assert torch.equal(kept, obj["scores"][:, 0])
    else:
        assert bool((kept == 0).all())


def test_classify_summary_counts_objects_without_positives_and_areas():
    objs = [
        {"class": 3, "scores": torch.zeros((0, 5)), "after_point_nms": None, "area_group": "small"},
        {"class": 1, "scores": torch.tensor([[0.1, 0.2, 0.0, 0, 0], [0.0, 0.1, 0.9, 0, 0]]),
         "after_point_nms": None, "area_group": "medium", "area": 300.0, "levels": torch.tensor([0, 1])},
        {"class": 0, "scores": torch.tensor([[0.8, 0.1, 0.0, 0, 0]]), "after_point_nms": None,
         "area_group": "small", "area": 100.0, "levels": torch.tensor([0])},
        {"class": 0, "scores": torch.tensor([[0.7, 0.1, 0.0, 0, 0]]), "after_point_nms": None,
         "area_group": "small", "area": 140.0, "levels": torch.tensor([0])},
    ]
    s = tool.classification_summary(objs, 5)
    # by size (sqrt(area): 17.3 -> 16-20, 10 and 11.8 -> 0-12) and by the best positive's level
    assert s["object_accuracy_by_size"] == {"0-12": {"objects": 2, "accuracy": 1.0},
                                            "16-20": {"objects": 1, "accuracy": 0.0}}
    assert s["object_accuracy_by_level"][1] == {"objects": 1, "accuracy": 0.0,
                                                "median_size": pytest.approx(300 ** 0.5)}
    assert s["object_accuracy_by_level"][0]["median_size"] == pytest.approx((10 + 140 ** 0.5) / 2)
    assert tool.size_bin(32 * 32) == ">= 32" and tool.size_bin(0) == "0-12" and tool.size_bin(12 * 12) == "12-16"
    text = tool.classify_markdown({"m": {"summary": s, "classes": ["a", "b", "c", "d", "e"]}})
    assert "| m | 100.0% (2) | - | 0.0% (1) | - | - | - |" in text
    assert "- m: level 0: 100.0% (2; 10.9 px), level 1: 0.0% (1; 17.3 px)" in text
    objs = objs[:2]
    for o in objs:
        o.pop("area", None), o.pop("levels", None)
    s = tool.classification_summary(objs, 5)
    assert s["objects"] == 2 and s["objects_without_positives"] == 1
    assert s["confusion"][3][5] == 1  # "none" column
    assert s["confusion"][1][2] == 1  # the best positive (0.9) says class 2 although one says 1
    assert s["accuracy_at_positives"] == 0.5 and s["object_accuracy"] == 0.0
    assert s["mean_max_score"] == pytest.approx(0.55) and s["mean_gt_score"] == pytest.approx(0.15)
    assert s["object_accuracy_by_area"] == {"medium": {"objects": 1, "accuracy": 0.0}}
    assert s["mean_positives_above"] == 1.0 and s["mean_positives_above_after_point_nms"] is None
    text = tool.classify_markdown({"m": {"summary": s, "classes": ["a", "b", "c", "d", "e"]}})
    assert "| m | 2 (1) | 2 | 50.0% | 0.550 | 0.150 | 0.0% | - / 0.0% / - |" in text


def test_classify_refuses_mask_rcnn_and_wrong_checkpoints(tmp_path):
    model = _model("quick/mask_rcnn_shapes.yaml")
    with pytest.raises(ValueError, match="SOLO and FCOS"):
        tool.scores_at_positives(model, [_input([(32, 32, 16)])])
    path = tmp_path / "m.pth"
    torch.save({"model": _model("FCOS/fcos_R18_shapes.yaml").state_dict()}, path)
    with pytest.raises(ValueError, match="does not fit"):
        tool.load_weights(_model("SOLO/solo_shapes.yaml"), str(path))
    fcos = _model("FCOS/fcos_R18_shapes.yaml")
    tool.load_weights(fcos, str(path))  # its own kind loads
    with pytest.raises(SystemExit):
        tool.main(["--classify"])
