"""Matrix NMS and mask NMS (d2seg.layers.matrix_nms) against straightforward loop
implementations of their definitions, on random masks."""
import math

import pytest
import torch

from d2seg.layers.matrix_nms import mask_iou_matrix, mask_nms, matrix_nms


def _random_masks(n, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(n):
        y0, x0 = torch.randint(0, size - 6, (2,), generator=g).tolist()
        h, w = torch.randint(4, 14, (2,), generator=g).tolist()
        masks[k, y0 : y0 + h, x0 : x0 + w] = True
        masks[k] &= torch.rand(size, size, generator=g) > 0.1  # ragged, not rectangles
    if n:
        masks[-1] = masks[0]  # an exact duplicate
    labels = torch.randint(0, 3, (n,), generator=g)
    if n:
        labels[-1] = labels[0]
    scores = torch.rand(n, generator=g)
    return masks, labels, scores


def _iou(a, b):
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return inter / union if union else 0.0


def _matrix_nms_reference(masks, labels, scores, kernel, sigma):
    """decay_j = min(1, min over better same-class i of f(IoU_ij) / f(max IoU of i with
    any better same-class mask)), written as plain loops."""
    f = (lambda x: math.exp(-sigma * x * x)) if kernel == "gaussian" else (lambda x: 1 - x)
    n = len(scores)
    order = sorted(range(n), key=lambda i: -float(scores[i]))
    same = (lambda a, b: True) if labels is None else (lambda a, b: labels[a] == labels[b])
    out = torch.empty(n)
    for pj, j in enumerate(order):
        decay = 1.0
        for pi in range(pj):
            i = order[pi]
            if not same(i, j):
                continue
            comp = max([_iou(masks[k], masks[i]) for k in order[:pi] if same(k, i)], default=0.0)
            decay = min(decay, f(_iou(masks[i], masks[j])) / max(f(comp), 1e-6))
        out[j] = float(scores[j]) * decay
    return out


def _mask_nms_reference(masks, labels, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for j in order:
        if all(labels[i] != labels[j] or _iou(masks[i], masks[j]) <= thr for i in keep):
            keep.append(j)
    return keep


def test_mask_iou_matrix_hand():
    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    m[0, :2] = True  # 8 px
    m[1, 1:3] = True  # 8 px, 4 shared with m0
    iou = mask_iou_matrix(m)
    assert iou[0, 1].item() == pytest.approx(4 / 12)
    assert iou[0, 0].item() == pytest.approx(1.0)
    assert iou[2, 2].item() == 0.0 and iou[0, 2].item() == 0.0  # empty mask


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matrix_nms_matches_reference(kernel, seed):
    masks, labels, scores = _random_masks(15, seed=seed)
    got = matrix_nms(masks, labels, scores, kernel=kernel, sigma=2.0)
    ref = _matrix_nms_reference(masks, labels.tolist(), scores, kernel, 2.0)
    assert torch.allclose(got, ref, atol=1e-5)
    # class-agnostic
    got = matrix_nms(masks, None, scores, kernel=kernel, sigma=2.0)
    ref = _matrix_nms_reference(masks, None, scores, kernel, 2.0)
    assert torch.allclose(got, ref, atol=1e-5)


def test_matrix_nms_properties():
    masks, labels, scores = _random_masks(15, seed=3)
    out = matrix_nms(masks, labels, scores)
    assert (out <= scores + 1e-7).all()
    # the best mask of each class keeps its score; an exact duplicate is decayed by e^-2
    for c in labels.unique():
        best = torch.nonzero(labels == c).flatten()[scores[labels == c].argmax()]
        assert out[best] == scores[best]


def test_matrix_nms_duplicate_hand():
    m = torch.zeros(4, 8, 8, dtype=torch.bool)
    m[0, :4, :4] = m[1, :4, :4] = True  # duplicates, same class
    m[2, :4, :2] = True  # half of them: IoU 0.5 with both, same class
    m[3, :4, :4] = True  # duplicate of another class: untouched
    labels = torch.tensor([1, 1, 1, 0])
    scores = torch.tensor([0.9, 0.8, 0.5, 0.7])
    out = matrix_nms(m, labels, scores, kernel="gaussian", sigma=2.0)
    # mask 1: decayed by mask 0 (IoU 1, mask 0 itself undecayed): e^-2.
    # mask 2: by mask 0: e^(-2*0.25); by mask 1: e^(-2*0.25) / e^(-2*1) = e^1.5 (> 1).
    expected = torch.tensor([0.9, 0.8 * math.exp(-2.0), 0.5 * math.exp(-0.5), 0.7])
    assert torch.allclose(out, expected)
    out = matrix_nms(m, labels, scores, kernel="linear")
    assert torch.allclose(out, torch.tensor([0.9, 0.0, 0.25, 0.7]))


def test_matrix_nms_zero_and_bad_input():
    m = torch.zeros(0, 8, 8, dtype=torch.bool)
    assert matrix_nms(m, torch.zeros(0, dtype=torch.long), torch.zeros(0)).shape == (0,)
    assert mask_nms(m, torch.zeros(0, dtype=torch.long), torch.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(torch.ones(1, 2, 2), None, torch.ones(1), kernel="box")
    with pytest.raises(ValueError, match="scores"):
        matrix_nms(torch.ones(2, 2, 2), None, torch.ones(3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_nms_matches_reference(seed):
    masks, labels, scores = _random_masks(15, seed=seed)
    for thr in (0.1, 0.3, 0.5):
        got = mask_nms(masks, labels, scores, iou_threshold=thr).tolist()
        assert got == _mask_nms_reference(masks, labels.tolist(), scores, thr)
