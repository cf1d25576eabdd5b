"""d2seg.layers.matrix_nms with classes: the IoU of same-class pairs only (one product per
class) equals the full IoU matrix masked by class, exactly, so Matrix NMS and mask NMS answer
as before (SOLO / SOLOv2 parity with AdelaiDet rests on it)."""
import torch

from d2seg.layers.matrix_nms import mask_iou_matrix, mask_nms, matrix_nms


def _full_iou_by_class(masks, labels):
    """The pairwise IoU written out with every pair computed, then masked by class."""
    f = masks.flatten(1).float()  # 0/1 products: exact integer sums in float32
    inter = f @ f.t()
    areas = f.sum(1)
    union = areas[:, None] + areas[None, :] - inter
    iou = inter / union.clamp(min=1e-6)
    return iou * (labels[:, None] == labels[None, :]).float()


def _candidates(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(6, 24, 32, generator=g) > 0.6
    # overlapping masks: each a random base mask with a few pixels flipped
    masks = base[torch.randint(0, 6, (n,), generator=g)] ^ (torch.rand(n, 24, 32, generator=g) > 0.9)
    masks[3] = False  # an empty mask
    labels = torch.randint(0, 5, (n,), generator=g)
    scores = torch.rand(n, generator=g)
    return masks, labels, scores


def test_iou_of_same_class_pairs_only():
    masks, labels, _ = _candidates()
    iou = mask_iou_matrix(masks, labels=labels)
    assert torch.equal(iou, _full_iou_by_class(masks, labels))
    # without classes: every pair
    assert torch.equal(mask_iou_matrix(masks), _full_iou_by_class(masks, torch.zeros_like(labels)))
    areas = masks.flatten(1).sum(1).float()
    assert torch.equal(mask_iou_matrix(masks, areas, labels), iou)


def test_nms_with_classes_equals_the_class_masked_matrix():
    masks, labels, scores = _candidates(seed=1)
    # Matrix NMS written out on the full, class-masked IoU (the module's formula)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = _full_iou_by_class(masks[order], labels[order]).triu(diagonal=1)
    comp = iou.max(dim=0).values
    decay = (torch.exp(-2.0 * iou**2) / torch.exp(-2.0 * comp**2)[:, None]).min(dim=0).values
    expected = torch.empty_like(scores)
    expected[order] = scores[order] * decay
    assert torch.equal(matrix_nms(masks, labels, scores, sigma=2.0), expected)
    # one class at a time gives the same decays: classes never suppress each other
    per_class = torch.empty_like(scores)
    for c in labels.unique():
        sel = labels == c
        per_class[sel] = matrix_nms(masks[sel], None, scores[sel])
    assert torch.equal(matrix_nms(masks, labels, scores), per_class)
    keep = mask_nms(masks, labels, scores, iou_threshold=0.3)
    kept_per_class = set()
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        kept_per_class |= set(idx[mask_nms(masks[idx], None, scores[idx], iou_threshold=0.3)].tolist())
    assert set(keep.tolist()) == kept_per_class and len(keep) < len(scores)


def test_no_masks():
    empty = torch.zeros(0, 4, 4, dtype=torch.bool)
    assert mask_iou_matrix(empty, labels=torch.zeros(0, dtype=torch.long)).shape == (0, 0)
