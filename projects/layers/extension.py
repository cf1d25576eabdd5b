"""Loading of the compiled extension ``d2seg._C`` and dispatch to the reference.

If the extension cannot be imported (d2seg was not built, or was built against another
torch), a single clear warning says so and every op falls back to its pure-PyTorch
reference, so nothing breaks silently.
"""
import logging
import os
import warnings

import torch

_EXT = None
_EXT_ERROR = None
_WARNED = False

logger = logging.getLogger(__name__)


def load_extension():
    """Import ``d2seg._C`` once; return the module or None (with the reason kept)."""
    global _EXT, _EXT_ERROR
    if _EXT is None and _EXT_ERROR is None:
        if os.environ.get("D2SEG_DISABLE_EXTENSION") == "1":
            _EXT_ERROR = "disabled by D2SEG_DISABLE_EXTENSION=1"
        else:
            try:
                from d2seg import _C  # noqa: F401

                _EXT = _C
            except ImportError as e:  # not built, or an ABI mismatch
                _EXT_ERROR = str(e)
    return _EXT


def extension_available():
    return load_extension() is not None


def extension_error():
    load_extension()
    return _EXT_ERROR


def _warn_fallback():
    global _WARNED
    if not _WARNED:
        _WARNED = True
        msg = (
            "d2seg's compiled extension d2seg._C is not available "
            f"({_EXT_ERROR}); using the pure-PyTorch reference ops, which are slower. "
            "Build it with `bash tools/setup.sh` or `pip install --no-build-isolation -e .`."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        logger.warning(msg)


# (op, reason) of every fallback to a reference that happened in this process.
_FALLBACKS = set()

# The dtypes every compiled op takes (float16 / bfloat16 accumulate in float32).
COMPILED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def log_fallback(op, reason):
    """Record that ``op`` ran its pure-PyTorch reference instead of the compiled kernel, and
    log it once per (op, reason) with the reason."""
    key = (op, reason)
    if key not in _FALLBACKS:
        _FALLBACKS.add(key)
        logger.warning("d2seg.layers.%s: running the pure-PyTorch reference instead of the compiled op: %s", op, reason)


def fallbacks():
    """The (op, reason) pairs of every fallback so far in this process (sorted)."""
    return sorted(_FALLBACKS)


def compiled_dtype_ok(op, *tensors):
    """Whether the compiled op takes these tensors' dtypes; a fallback is logged if not."""
    bad = sorted({str(t.dtype) for t in tensors if t is not None and t.dtype not in COMPILED_DTYPES})
    if bad:
        log_fallback(op, f"dtype {', '.join(bad)} has no compiled kernel")
        return False
    return True


def autocast_on(device):
    """Whether a torch.autocast region is active for tensors on ``device``."""
    return torch.is_autocast_enabled(device.type) if device.type in ("cpu", "cuda") else False


def use_compiled(*tensors, op=None):
    """Whether to run the compiled op for these inputs (else: the reference, logged). Never
    while tracing: an ONNX export (d2seg.deploy) records the pure-PyTorch reference, made of
    standard ONNX ops."""
    if torch.jit.is_tracing():
        return False
    if load_extension() is None:
        _warn_fallback()
        if op is not None:
            log_fallback(op, f"d2seg._C is not available ({_EXT_ERROR})")
        return False
    if any(t.is_cuda for t in tensors) and not _EXT.has_cuda():
        raise RuntimeError(
            "d2seg._C was built without CUDA kernels but got CUDA tensors; rebuild with "
            "FORCE_CUDA=1 on a machine with the CUDA toolkit."
        )
    return True


def axpy_reference(x, y, alpha):
    return alpha * x + y


def axpy(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``alpha * x + y`` through the compiled op (a minimal op that keeps the build tested).

    Args:
        x, y: tensors of the same shape, dtype and device.
    """
    if x.shape != y.shape:
        raise ValueError(f"axpy: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"axpy: x and y must be on the same device, got {x.device} and {y.device}")
    if use_compiled(x, y):
        return torch.ops.d2seg.axpy(x, y, float(alpha))
    return axpy_reference(x, y, alpha)


# The autocast policy of each compiled op (registered in csrc/autocast.cpp; backward ops
# have none: autograd calls them with the forward's dtypes).
AUTOCAST_POLICIES = {
    "instance_aware_conv": "input, weight, bias -> autocast dtype",
    "dynamic_mask_head": "mask_feats, params -> autocast dtype; instance_locations, scales -> float32",
    "sample_points": "features keep their dtype; coords, boxes -> float32",
}


def _probe(op, dt):
    """Run ``op`` on a tiny CPU input of dtype ``dt``; whether its kernel took it."""
    ops = torch.ops.d2seg
    try:
        if op == "instance_aware_conv":
            out = ops.instance_aware_conv(torch.ones(1, 2, 3, 3, dtype=dt), torch.ones(1, 2, 2, 1, 1, dtype=dt), None)
        elif op == "dynamic_mask_head":
            out = ops.dynamic_mask_head(torch.ones(1, 1, 2, 2, dtype=dt), torch.zeros(1, dtype=torch.long),
                                        torch.ones(1, 2, dtype=dt), None, None, 8, 1, 8)
        else:
            out = ops.sample_points(torch.ones(1, 1, 2, 2, dtype=dt), torch.full((1, 1, 2), 0.5, dtype=dt), None, None, 1.0)
        return out.dtype == dt
    except RuntimeError:
        return False


def op_precision_support():
    """For each compiled op: the dtypes its CPU kernel takes (probed), its autocast policy
    and the devices it is registered for. Empty if the extension is not built."""
    if load_extension() is None:
        return []
    rows = []
    for op, policy in AUTOCAST_POLICIES.items():
        name = f"d2seg::{op}"
        dtypes = [str(dt).replace("torch.", "") for dt in COMPILED_DTYPES if _probe(op, dt)]
        keys = [k.replace("Autocast", "") for k in ("AutocastCPU", "AutocastCUDA")
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        rows.append({"op": op, "dtypes": dtypes, "autocast": keys, "policy": policy})
    return rows
