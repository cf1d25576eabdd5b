"""d2seg.layers.mask_boxes.masks_to_boxes (SOLO's and SparseInst's result boxes) against two
independent implementations: Detectron2's BitMasks.get_bounding_boxes (a loop over the masks,
what SOLO used before) and torchvision's masks_to_boxes (inclusive max coordinates, + 1)."""
import torch
from detectron2.structures import BitMasks
from torchvision.ops import masks_to_boxes as tv_masks_to_boxes

from d2seg.layers.mask_boxes import masks_to_boxes
from d2seg.sparseinst.sparseinst import masks_to_boxes as sparseinst_masks_to_boxes


def test_masks_to_boxes():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(5, 13, 17, generator=g) > 0.97
    m[2] = False  # empty
    m[3] = False
    m[3, 12, 16] = True  # one pixel in the corner
    boxes = masks_to_boxes(m).tensor
    assert torch.equal(boxes, BitMasks(m).get_bounding_boxes().tensor)
    nonempty = m.flatten(1).any(1)
    expected = tv_masks_to_boxes(m[nonempty]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(boxes[nonempty], expected)
    assert torch.equal(boxes[2], torch.zeros(4))
    assert boxes[3].tolist() == [16.0, 12.0, 17.0, 13.0]
    assert masks_to_boxes(m[:0]).tensor.shape == (0, 4)
    assert sparseinst_masks_to_boxes is masks_to_boxes


def test_masks_to_boxes_strided_and_float_masks():
    """A non-contiguous view (masks cut out of a larger bool tensor, as a padded result slice)
    and {0, 1} float masks give the boxes of Detectron2's loop."""
    g = torch.Generator().manual_seed(1)
    big = torch.rand(4, 20, 30, generator=g) > 0.95
    big[1] = False
    view = big[:, 3:17, 5:26].transpose(1, 2)  # (4, 21, 14), strided
    expected = BitMasks(view.contiguous()).get_bounding_boxes().tensor
    assert torch.equal(masks_to_boxes(view).tensor, expected)
    assert torch.equal(masks_to_boxes(view.float()).tensor, expected)
