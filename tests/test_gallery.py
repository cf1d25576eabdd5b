"""tools/gallery.py: the matching that counts what a model got right (by hand), and the tool
end to end on freshly initialised models (real checkpoint files, real shapes data)."""
import importlib.util
import logging
import os

import numpy as np
import torch
from PIL import Image

import d2seg  # noqa: F401
from d2seg.engine import Trainer, setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gallery_tool", os.path.join(REPO, "tools", "gallery.py"))
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


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


def _init_checkpoint(config, path):
    torch.manual_seed(0)
    model = Trainer.build_model(setup_cfg(config, ["MODEL.DEVICE", "cpu"]))
    torch.save({"model": model.state_dict()}, path)


def test_tool_end_to_end_on_initialised_models(tmp_path, capsys):
    inst = os.path.join(REPO, "configs", "FCOS", "fcos_R18_shapes.yaml")
    sem = os.path.join(REPO, "configs", "quick", "semantic_fpn_shapes.yaml")
    _init_checkpoint(inst, tmp_path / "inst.pth")
    _init_checkpoint(sem, tmp_path / "sem.pth")
    out = tmp_path / "gallery"
    rc = tool.main(["--model", inst, str(tmp_path / "inst.pth"), "--model", sem, str(tmp_path / "sem.pth"),
                    "--num", "2", "--threshold", "0.05", "--scale", "1", "--output", str(out)])
    assert rc == 0
    # two 128 px pictures in a row of three columns
    assert Image.open(out / "fcos_R18_shapes.jpg").size == (3 * 128, 128)
    assert Image.open(out / "semantic_fpn_shapes.jpg").size == (3 * 128, 128)
    rows = (out / "gallery_rows.md").read_text().splitlines()
    assert rows[0].startswith("| config | threshold | objects |") and len(rows) == 4
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[1] == "0.05"
    objects, right, wrong, missed, unmatched = (int(c) for c in cells[2:])
    assert objects > 0 and right + wrong + missed == objects and unmatched >= 0
    assert "pixel accuracy" in rows[3]
    assert rows[2] in capsys.readouterr().out
    # the process is left as it was: the rest of the suite trains in it, and reads d2seg's logs
    assert torch.is_grad_enabled()
    assert logging.getLogger("d2seg").propagate


def test_tool_names_a_missing_weights_file(tmp_path, capsys):
    config = os.path.join(REPO, "configs", "FCOS", "fcos_R18_shapes.yaml")
    assert tool.main(["--model", config, str(tmp_path / "nope.pth"), "--output", str(tmp_path)]) == 2
    assert "nope.pth" in capsys.readouterr().err
