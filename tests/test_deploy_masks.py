"""d2seg.deploy.masks.paste_masks (the export graphs' pasting: two matrix products with
grid_sample's 1-D weights) gives Detectron2's paste_masks_in_image: the same pasted values up to
float rounding, hence the same masks off the threshold's rounding ties; boxes inside, across the
border, larger than the image, tiny."""
import pytest
import torch
from detectron2.layers.mask_ops import _do_paste_mask, paste_masks_in_image

from d2seg.deploy.masks import paste_masks


def _case(seed, h, w, n=40, s=28):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, s, s, generator=g)
    centre = torch.rand(n, 2, generator=g) * torch.tensor([w, h])  # boxes overlap the image (as clipped ones do)
    side = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.8 + 2
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=1)
    boxes[0] = torch.tensor([-20.0, -30.0, w + 25.0, h + 40.0])  # larger than the image
    boxes[1] = torch.tensor([3.0, 4.0, 4.5, 5.2])  # tiny
    return masks, boxes


@pytest.mark.parametrize("seed,h,w", [(0, 60, 80), (1, 97, 41), (2, 128, 128)])
def test_equals_detectron2s_pasting(seed, h, w):
    masks, boxes = _case(seed, h, w)
    ours = paste_masks(masks, boxes, torch.tensor([h, w]), 0.5)
    theirs = paste_masks_in_image(masks, boxes, (h, w), threshold=0.5)
    values, _ = _do_paste_mask(masks[:, None], boxes, h, w, skip_empty=False)  # Detectron2's floats
    ties = (values - 0.5).abs() < 1e-5
    assert ours.shape == theirs.shape == (len(masks), h, w) and ours.dtype == torch.bool
    assert torch.equal(ours[~ties], theirs[~ties])
    assert ties.float().mean() < 1e-3  # the comparison covers nearly every pixel
    assert theirs.any() and (~theirs).any()
    assert (boxes[:, 0] < 0).any() and (boxes[:, 2] > w).any()  # boxes across the border are in the case


def test_no_masks():
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), torch.tensor([10, 12]), 0.5)
    assert out.shape == (0, 10, 12)
