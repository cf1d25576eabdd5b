"""PointRend semantic inference shortcuts that must not change a single value: the
uncertainty (second best - best logit) without torch.topk, and D2SegSemanticSegmentor's
output without Detectron2's resize to the size the logits already have."""
import pytest
import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess

from d2seg.pointrend.semantic_seg import semantic_output
from d2seg.pointrend.subdivision import semantic_uncertainty


@pytest.mark.parametrize("classes", [2, 3, 19])
def test_semantic_uncertainty_equals_topk(classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(2, classes, 17, 23, generator=g)
    logits[0, :, 0, 0] = 1.5  # every class tied
    logits[1, 1, 2, 3] = logits[1, 0, 2, 3] = logits[1, :, 2, 3].max() + 1  # best value twice
    top2 = torch.topk(logits, k=2, dim=1).values
    expected = (top2[:, 1] - top2[:, 0]).unsqueeze(1)
    got = semantic_uncertainty(logits)
    assert torch.equal(got, expected)
    assert got[0, 0, 0, 0] == 0 and got[1, 0, 2, 3] == 0
    points = logits.flatten(2)[:, :, :40]  # (R, C, P) at points, as in training
    assert torch.equal(semantic_uncertainty(points), expected.flatten(2)[:, :, :40])


def test_semantic_output_equals_detectron2_postprocess():
    g = torch.Generator().manual_seed(0)
    padded = torch.randn(5, 32, 48, generator=g)
    for image_size, out_size in (((32, 48), (32, 48)), ((30, 41), (30, 41)), ((30, 41), (60, 82))):
        expected = sem_seg_postprocess(padded, image_size, *out_size)
        got = semantic_output(padded, image_size, *out_size)
        assert got.shape == expected.shape and torch.equal(got, expected)
