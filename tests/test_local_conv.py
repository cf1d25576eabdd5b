"""d2seg.layers.conv2d_at_locations: a convolution evaluated at chosen output locations equals
the full convolution (F.conv2d) there, borders included."""
import pytest
import torch
from torch import nn

from d2seg.layers import conv2d_at_locations, supports_conv2d_at_locations


@pytest.mark.parametrize("k,bias", [(3, True), (1, True), (5, False)])
def test_equals_full_convolution(k, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 7, k, padding=k // 2, bias=bias)
    x = torch.randn(6, 9, 11)
    ys = torch.tensor([0, 0, 8, 4, 8, 3])
    xs = torch.tensor([0, 10, 0, 5, 10, 3])  # corners, edges and the inside
    full = conv(x[None])[0]
    out = conv2d_at_locations(conv, x, ys, xs)
    assert out.shape == (6, 7)
    torch.testing.assert_close(out, full[:, ys, xs].t(), atol=1e-6, rtol=1e-5)
    assert conv2d_at_locations(conv, x, ys[:0], xs[:0]).shape == (0, 7)


def test_supported_modules():
    assert supports_conv2d_at_locations(nn.Conv2d(4, 4, 3, padding=1))
    assert not supports_conv2d_at_locations(nn.Conv2d(4, 4, 3))  # output smaller than input
    assert not supports_conv2d_at_locations(nn.Conv2d(4, 4, 3, padding=1, stride=2))
    assert not supports_conv2d_at_locations(nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    assert not supports_conv2d_at_locations(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert not supports_conv2d_at_locations(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not supports_conv2d_at_locations(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)))
