"""BlendMask's crop (d2seg.blendmask.blender.crop_bases: torchvision's roi_align, aligned, a
fixed sampling ratio) exported to ONNX RoiAlign gives torchvision's values under ONNX Runtime
on boxes inside, across and wholly outside the map, tiny, huge and inverted, on several images
of a batch (dynamic sizes): the BlendMask graph with CROP_UNCLIPPED_BOXES True crops boxes that
leave the image with it."""
import onnxruntime as ort
import pytest
import torch
from torchvision.ops import roi_align

from d2seg.blendmask.blender import crop_bases

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 0.25


def _boxes(n, h, w, seed):
    """(n + 8, 4) boxes on an input of h x w pixels (the map is h/4 x w/4): random centres
    from half a side before to half a side after the image, sides from ~0 to 9 image sides,
    then fixed cases (wholly outside on each side, huge, tiny, a point, inverted)."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([w, h], dtype=torch.float32)
    centre = torch.rand(n, 2, generator=g) * size * 2 - size / 2
    side = torch.rand(n, 2, generator=g) * size * (torch.rand(n, 1, generator=g) * 3) ** 2
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=1)
    fixed = torch.tensor([
        [-100.0, -100.0, -50.0, -60.0],  # wholly before the map
        [w + 20.0, h + 30.0, w + 90.0, h + 95.0],  # wholly after it
        [-3.0 * w, -3.0 * h, 4.0 * w, 4.0 * h],  # huge, around it
        [10.0, 11.0, 10.2, 11.1],  # tiny
        [-1.0, -1.5, -1.0, -1.5],  # a point just outside: on the map at (-0.75, -0.875), clamped to (0, 0)
        [w - 1.0, h - 1.0, w + 3.0, h + 5.0],  # across the last row and column
        [20.0, 15.0, 8.0, 4.0],  # inverted
        [0.0, 0.0, float(w), float(h)],  # the image
    ])
    return torch.cat([boxes, fixed])


def _reference(features, boxes, inds, size, ratio):
    rois = torch.cat([inds[:, None].to(boxes.dtype), boxes], dim=1)
    return roi_align(features, rois, (size, size), spatial_scale=SCALE, sampling_ratio=ratio, aligned=True)


class _Crop(torch.nn.Module):
    def __init__(self, ratio):
        super().__init__()
        self.ratio = ratio

    def forward(self, features, boxes, inds):
        return crop_bases(features, boxes, inds, 14, SCALE, self.ratio)


@pytest.mark.parametrize("ratio", [1, 2])
def test_onnxruntime_equals_torchvision(tmp_path, ratio):
    """Exported once (dynamic batch, map size and number of boxes), run at two other sizes."""
    path = str(tmp_path / "roi_align.onnx")
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(2, 3, 9, 11, generator=g), _boxes(10, 36, 44, seed=0), torch.zeros(18, dtype=torch.long))
    torch.onnx.export(_Crop(ratio), example, path, dynamo=False, opset_version=17,
                      input_names=["features", "boxes", "inds"], output_names=["rois"],
                      dynamic_axes={"features": [0, 2, 3], "boxes": [0], "inds": [0], "rois": [0]})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n, (h, w) in [(3, (13, 17)), (1, (6, 20))]:
        features = torch.randn(n, 3, h, w, generator=g)
        boxes = _boxes(100, h * 4, w * 4, seed=h)
        inds = torch.randint(0, n, (len(boxes),), generator=g)
        out = session.run(None, {"features": features.numpy(), "boxes": boxes.numpy(), "inds": inds.numpy()})[0]
        ref = _reference(features, boxes, inds, 14, ratio)
        torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-5, rtol=0)
        # the cases the test is about: wholly outside (zeros), clamped to the first cell, a huge box
        assert (ref[-8] == 0).all() and (ref[-7] == 0).all()
        assert torch.equal(ref[-4], features[inds[-4], :, :1, :1].expand(3, 14, 14))
        huge = ref[-6].abs().sum(0)
        assert (huge == 0).any() and (huge > 0).any()
