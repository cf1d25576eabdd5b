"""A convolution evaluated at a few output locations only.

At inference, several one-stage mask methods need a 3x3 convolution of a feature map (e.g.
CondInst's controller, BlendMask's top layer on FCOS's box tower) only at the locations of
the final detections. Evaluating it there (a gathered k x k patch per location times the
weight matrix) gives the values of the full convolution at those locations, up to the order
of the float sums, for a fraction of the cost.

Shape shorthand: C input channels, D output channels, H, W map size, R locations, k kernel.
"""
import torch
from torch import Tensor, nn

__all__ = ["conv2d_at_locations", "supports_conv2d_at_locations"]


def supports_conv2d_at_locations(module) -> bool:
    """True when ``module`` is a plain ``nn.Conv2d`` whose output has the input's size: odd
    square kernel, padding k // 2 with zeros, stride 1, dilation 1, one group."""
    if type(module) is not nn.Conv2d:
        return False
    kh, kw = module.kernel_size
    return (kh == kw and kh % 2 == 1 and module.padding == (kh // 2, kw // 2)
            and module.stride == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def conv2d_at_locations(conv: nn.Conv2d, x: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """``conv(x[None])[0, :, ys, xs].T`` without the full convolution.

    Args:
        conv: a module for which :func:`supports_conv2d_at_locations` holds.
        x: (C, H, W) input map.
        ys, xs: (R,) integer row and column of each output location.
    Returns:
        (R, D) the convolution's output at those locations.
    """
    k = conv.kernel_size[0]
    p = k // 2
    D = conv.out_channels
    if ys.numel() == 0:
        return x.new_zeros((0, D))
    padded = torch.nn.functional.pad(x, (p, p, p, p)) if p else x
    offs = torch.arange(k, device=x.device)
    rows = (ys[:, None] + offs[None, :])[:, :, None]  # (R, k, 1)
    cols = (xs[:, None] + offs[None, :])[:, None, :]  # (R, 1, k)
    patches = padded[:, rows, cols]  # (C, R, k, k)
    patches = patches.permute(1, 0, 2, 3).reshape(ys.numel(), -1)  # (R, C * k * k)
    out = patches @ conv.weight.reshape(D, -1).t()
    if conv.bias is not None:
        # under autocast the product is in the autocast dtype, as the full convolution's
        # output is: the bias joins it in that dtype
        out = out + conv.bias.to(out.dtype)
    return out
