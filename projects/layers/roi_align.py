"""A faster CPU backward for torchvision's RoIAlign, with bit-identical gradients.

Detectron2's ``ROIPooler`` (the box and mask heads of Mask R-CNN and PointRend) calls
``torchvision.ops.roi_align``. On the CPU its backward recomputes every sample's bilinear
weights once per channel and runs on one thread: 13.6 % of a training iteration of the
shapes yardstick (Mask R-CNN, one thread). d2seg's kernel (``d2seg::roi_align_backward``,
csrc/roi_align/) computes each region's samples once, scatters every channel with them in
parallel, and adds each contribution in torchvision's order with the same float operations,
so the gradient is bit for bit torchvision's (tests/test_roi_align_backward.py). The model,
its outputs and its training are unchanged; only the time of an iteration is.

Memory: the kernel keeps a table of every sample's corners and weights (48 / 56 / 72 bytes
per sample in float16 / float32 / float64; regions x bins x samples in all). It builds and
uses the table in chunks of at most ``max_table_bytes`` (:data:`MAX_TABLE_BYTES`, 4 MiB), so
its extra memory is bounded whatever the number of regions; the chunking changes no bit of
the result (:func:`sample_table_bound`; tests/test_roi_align_backward.py).

Nothing is registered by ``import d2seg``: :func:`use_fast_roi_align_backward` makes the
kernel the CPU kernel of ``torchvision::_roi_align_backward`` for the whole process, and
d2seg's Trainer calls it when ``MODEL.FAST_ROI_ALIGN_BACKWARD`` is True (the default of
d2seg's configs). :func:`use_torchvision_roi_align_backward` gives torchvision's own kernel
back. CUDA and other devices always keep torchvision's kernels.
"""
import logging
import warnings

import torch

from .extension import load_extension

__all__ = [
    "MAX_TABLE_BYTES",
    "use_fast_roi_align_backward",
    "use_torchvision_roi_align_backward",
    "roi_align_backward_from_config",
    "fast_roi_align_backward_active",
    "roi_align_backward",
    "sample_table_bound",
]

logger = logging.getLogger(__name__)

# Bound on the kernel's sample table (bytes); the op's schema default (csrc/roi_align/).
MAX_TABLE_BYTES = 4 * 2**20

_LIB = None


def roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                       height, width, sampling_ratio, aligned, max_table_bytes=MAX_TABLE_BYTES):
    """d2seg's CPU kernel, with torchvision's ``_roi_align_backward`` arguments.

    Args:
        grad: (K, C, PH, PW) gradient of the pooled features.
        rois: (K, 5) regions (batch index, x0, y0, x1, y1), grad's dtype.
        max_table_bytes: bound on the sample table held at once (see :func:`sample_table_bound`).
    Returns:
        (batch_size, C, height, width) gradient of the feature map.
    """
    return torch.ops.d2seg.roi_align_backward(
        grad, rois, float(spatial_scale), int(pooled_height), int(pooled_width), int(batch_size),
        int(channels), int(height), int(width), int(sampling_ratio), bool(aligned), int(max_table_bytes))


def sample_table_bound(dtype=torch.float32, max_table_bytes=MAX_TABLE_BYTES):
    """(bytes of one table entry, samples per chunk) of the kernel for ``dtype``: it holds at
    most ``samples per chunk`` entries at once, max(1, max_table_bytes // entry bytes)."""
    if load_extension() is None:
        raise RuntimeError("d2seg._C is not built: the RoIAlign backward kernel is unavailable")
    entry, samples = torch.ops.d2seg.roi_align_backward_table(dtype, int(max_table_bytes))
    return int(entry), int(samples)


def _kernel_built():
    """Whether d2seg._C has the kernel with its memory bound (``max_table_bytes``)."""
    if load_extension() is None or not hasattr(torch.ops.d2seg, "roi_align_backward"):
        return False
    args = torch.ops.d2seg.roi_align_backward.default._schema.arguments
    return any(a.name == "max_table_bytes" for a in args)


def _torchvision_backward_op():
    """torchvision's ``_roi_align_backward`` op, or None when torchvision lacks it."""
    try:
        import torchvision  # noqa: F401  (defines torchvision::_roi_align_backward)

        return torch.ops.torchvision._roi_align_backward
    except (ImportError, AttributeError, RuntimeError):
        return None


def use_fast_roi_align_backward():
    """Make d2seg's kernel the CPU kernel of ``torchvision::_roi_align_backward`` in this
    process (once; every later RoIAlign backward on the CPU runs it).

    Returns True when it is (now or already) registered, False (with a log line) when the
    extension or torchvision's op is missing."""
    global _LIB
    if _LIB is not None:
        return True
    if not _kernel_built():
        logger.info("d2seg._C is not built (or predates the bounded kernel: rebuild with `make build`): "
                    "RoIAlign's CPU backward stays torchvision's")
        return False
    if _torchvision_backward_op() is None:
        logger.info("torchvision has no _roi_align_backward op: nothing to replace")
        return False
    lib = torch.library.Library("torchvision", "IMPL")
    with warnings.catch_warnings():
        # PyTorch warns that a kernel for (op, CPU) is being replaced: that is the point.
        warnings.simplefilter("ignore")
        lib.impl("_roi_align_backward", roi_align_backward, "CPU")
    _LIB = lib
    return True


def use_torchvision_roi_align_backward():
    """Undo :func:`use_fast_roi_align_backward`: torchvision's own CPU kernel runs again."""
    global _LIB
    if _LIB is not None:
        _LIB._destroy()
        _LIB = None


def roi_align_backward_from_config(cfg):
    """RoIAlign's CPU backward as ``cfg.MODEL.FAST_ROI_ALIGN_BACKWARD`` says: d2seg's kernel
    when True, torchvision's own when False (what d2seg's Trainer does before training).
    Returns whether d2seg's kernel is in use."""
    if cfg.MODEL.FAST_ROI_ALIGN_BACKWARD:
        return use_fast_roi_align_backward()
    use_torchvision_roi_align_backward()
    return False


def fast_roi_align_backward_active():
    """Whether torchvision's CPU RoIAlign backward runs d2seg's kernel in this process."""
    return _LIB is not None
