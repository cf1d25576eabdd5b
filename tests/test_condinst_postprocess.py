"""CondInst's postprocess keeps its (R, 1, h, w) mask probabilities out of Detectron2's
detector_postprocess and indexes them by the rows it keeps: same result as filtering every
field together (an independent computation below), with and without dropped detections."""
import types

import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

from d2seg.condinst.condinst import CondInstMaskHead


def _result(boxes, h=20, w=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = Instances((h, w))
    r.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    r.scores = torch.rand(len(boxes), generator=g)
    r.pred_classes = torch.arange(len(boxes))
    r.pred_global_masks = torch.rand(len(boxes), 1, h, w, generator=g)
    return r


@pytest.mark.parametrize("out_hw", [(20, 30), (40, 45)])
def test_postprocess_filters_masks_with_boxes(out_hw):
    head = types.SimpleNamespace(mask_threshold=0.5)
    # the second box is empty (x0 == x1): detector_postprocess drops it
    r = _result([[1, 2, 10, 12], [5, 5, 5, 9], [0, 0, 30, 20]])
    probs, classes = r.pred_global_masks.clone(), r.pred_classes.clone()
    out = CondInstMaskHead.postprocess(head, r, *out_hw)
    assert out.pred_classes.tolist() == [0, 2]
    expected = F.interpolate(probs[[0, 2]], size=out_hw, mode="bilinear", align_corners=False)[:, 0] > 0.5
    assert out.pred_masks.shape == (2,) + out_hw
    assert torch.equal(out.pred_masks, expected)
    assert not out.has("postprocess_row") and not out.has("pred_global_masks")
    assert torch.equal(classes[[0, 2]], out.pred_classes)


def test_postprocess_keeps_all_and_empty():
    head = types.SimpleNamespace(mask_threshold=0.5)
    r = _result([[1, 2, 10, 12], [0, 0, 30, 20]])
    probs = r.pred_global_masks.clone()
    out = CondInstMaskHead.postprocess(head, r, 20, 30)
    assert torch.equal(out.pred_masks, probs[:, 0] > 0.5)
    empty = CondInstMaskHead.postprocess(head, _result([[5, 5, 5, 9]]), 20, 30)
    assert len(empty) == 0 and empty.pred_masks.shape == (0, 20, 30)
