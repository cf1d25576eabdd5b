"""A faster CPU backward for torchvision's RoIAlign, with bit-identical gradients.

Detectron2's ``ROIPooler`` (the box and mask heads of Mask R-CNN and PointRend) calls
``torchvision.ops.roi_align``. On the CPU its backward recomputes every sample's bilinear
weights once per channel and runs on one thread: 13.6 % of a training iteration of the
shapes yardstick (Mask R-CNN, one thread). d2seg's kernel (``d2seg::roi_align_backward``,
csrc/roi_align/) computes each region's samples once, scatters every channel with them in
parallel, and adds each contribution in torchvision's order with the same float operations,
so the gradient is bit for bit torchvision's (tests/test_roi_align_backward.py). The model,
its outputs and its training are unchanged; only the time of an iteration is.

:func:`use_fast_roi_align_backward` registers that kernel as the CPU kernel of
``torchvision::_roi_align_backward``. ``import d2seg`` calls it, unless the environment sets
``D2SEG_TORCHVISION_ROI_ALIGN_BACKWARD=1`` (keep torchvision's own kernel). CUDA and other
devices keep torchvision's kernels.
"""
import logging
import os
import warnings

import torch

from .extension import load_extension

__all__ = ["use_fast_roi_align_backward", "fast_roi_align_backward_active", "roi_align_backward"]

logger = logging.getLogger(__name__)

_LIB = None


def roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                       height, width, sampling_ratio, aligned):
    """d2seg's CPU kernel, with torchvision's ``_roi_align_backward`` arguments.

    Args:
        grad: (K, C, PH, PW) gradient of the pooled features.
        rois: (K, 5) regions (batch index, x0, y0, x1, y1), grad's dtype.
    Returns:
        (batch_size, C, height, width) gradient of the feature map.
    """
    return torch.ops.d2seg.roi_align_backward(
        grad, rois, float(spatial_scale), int(pooled_height), int(pooled_width), int(batch_size),
        int(channels), int(height), int(width), int(sampling_ratio), bool(aligned))


def use_fast_roi_align_backward():
    """Make d2seg's kernel the CPU kernel of ``torchvision::_roi_align_backward`` (once).

    Returns True when it is (now or already) registered, False when the extension or
    torchvision's op is missing or the environment opted out."""
    global _LIB
    if _LIB is not None:
        return True
    if os.environ.get("D2SEG_TORCHVISION_ROI_ALIGN_BACKWARD") == "1":
        return False
    if load_extension() is None or not hasattr(torch.ops.d2seg, "roi_align_backward"):
        return False
    try:
        import torchvision  # noqa: F401  (defines torchvision::_roi_align_backward)

        torch.ops.torchvision._roi_align_backward  # noqa: B018
    except (ImportError, AttributeError, RuntimeError):
        return False
    lib = torch.library.Library("torchvision", "IMPL")
    with warnings.catch_warnings():
        # PyTorch warns that a kernel for (op, CPU) is being replaced: that is the point.
        warnings.simplefilter("ignore")
        lib.impl("_roi_align_backward", roi_align_backward, "CPU")
    _LIB = lib
    return True


def fast_roi_align_backward_active():
    """Whether torchvision's CPU RoIAlign backward runs d2seg's kernel in this process."""
    return _LIB is not None
