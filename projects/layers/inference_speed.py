"""Inference-only speed-ups of whole models that leave parameters, checkpoints and the
training path untouched (``MODEL.FAST_INFERENCE``; docs/benchmark.md, "Inference speed-ups at
parity").

* :func:`fold_frozen_batchnorm`: a Detectron2 ``Conv2d`` followed by its ``FrozenBatchNorm2d``
  (every conv of the ResNet backbones) runs, without autograd, as one convolution with the
  normalisation folded into its weight and bias: ``conv(x, w * s) + (b - mean * s)`` with
  ``s = gamma / sqrt(var + eps)``. The folded tensors are cached and recomputed when any of
  the six tensors changes (loading a checkpoint, an optimiser step). With autograd enabled or
  in training mode the layer runs exactly as before.
* :func:`to_inference_layout`: the input image in channels-last memory layout. Convolutions
  then keep every activation of the network channels-last, which oneDNN (MKLDNN) convolves
  without reordering and where nearest / bilinear upsampling, pooling and element-wise sums
  are much faster on the CPU. Values are the same up to float rounding (summation order).

Both change results only by float rounding (measured: <= 1e-6 relative on the parity
fixtures, tests/test_parity_*.py).
"""
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

__all__ = ["FoldedBatchNormConv2d", "fold_frozen_batchnorm", "to_inference_layout"]


def _versions(*tensors):
    return tuple((t.data_ptr(), t._version) for t in tensors)


class FoldedBatchNormConv2d(Conv2d):
    """Detectron2's ``Conv2d`` whose ``norm`` is a ``FrozenBatchNorm2d``, folded at inference.

    Same attributes and state dict as the ``Conv2d`` it replaces (made by
    :func:`fold_frozen_batchnorm`, which changes the class of existing modules)."""

    def forward(self, x):
        if self.training or torch.is_grad_enabled() or not isinstance(self.norm, FrozenBatchNorm2d):
            return super().forward(x)
        weight, bias = self._folded()
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _folded(self):
        bn = self.norm
        tensors = [self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        if self.bias is not None:
            tensors.append(self.bias)
        key = _versions(*tensors) + (self.weight.dtype, self.weight.device)
        cache = self.__dict__.get("_folded_cache")
        if cache is None or cache[0] != key:
            scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
            weight = self.weight * scale.view(-1, 1, 1, 1)
            bias = bn.bias - bn.running_mean * scale
            if self.bias is not None:
                bias = bias + self.bias * scale
            cache = (key, weight.detach(), bias.detach())
            self.__dict__["_folded_cache"] = cache  # not a buffer: never saved
        return cache[1], cache[2]

    def __getstate__(self):  # copies and pickles leave the cache behind
        state = dict(super().__getstate__())
        state.pop("_folded_cache", None)
        return state


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Make every Detectron2 ``Conv2d`` of ``module`` whose norm is a ``FrozenBatchNorm2d``
    a :class:`FoldedBatchNormConv2d` (in place; state dict and training unchanged).
    Returns the number of layers changed."""
    n = 0
    for m in module.modules():
        if type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d):
            m.__class__ = FoldedBatchNormConv2d
            n += 1
    return n


def to_inference_layout(x: torch.Tensor, training: bool) -> torch.Tensor:
    """The backbone's input at inference: (N, C, H, W) in channels-last layout (see the
    module docstring); unchanged in training."""
    if training or x.dim() != 4 or torch.is_grad_enabled():
        return x
    return x.contiguous(memory_format=torch.channels_last)
