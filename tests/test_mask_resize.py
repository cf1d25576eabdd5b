"""d2seg.layers.mask_resize: masks resized and thresholded a chunk at a time give the same
bools as one call, and no chunk holds more floats than allowed."""
import pytest
import torch
import torch.nn.functional as F

from d2seg.layers.mask_resize import resize_and_threshold


def bilinear(size):
    return lambda m: F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("max_chunk_bytes", [1, 3 * 40 * 52 * 4, 1 << 28])
def test_chunks_give_the_one_call_result(max_chunk_bytes):
    torch.manual_seed(0)
    probs = torch.rand(7, 9, 13)
    resize = bilinear((40, 52))
    seen = []

    def counting(m):
        seen.append(len(m))
        return resize(m)

    out = resize_and_threshold(probs, counting, 0.5, max_chunk_bytes=max_chunk_bytes)
    assert out.dtype == torch.bool and torch.equal(out, resize(probs) > 0.5)
    per_chunk = max(1, max_chunk_bytes // (40 * 52 * 4))
    assert sum(seen) == 7 and max(seen) <= per_chunk
    if max_chunk_bytes == 1:
        assert seen == [1] * 7


def test_no_masks():
    out = resize_and_threshold(torch.zeros(0, 9, 13), bilinear((40, 52)), 0.5)
    assert out.shape == (0, 40, 52) and out.dtype == torch.bool
