"""Modulated deformable convolution (DCNv2) built on ``torchvision.ops.deform_conv2d``.

Used as the optional last conv of each FCOS tower (``MODEL.FCOS.USE_DEFORMABLE``), as in
MEInst's best configuration. Works on CPU and CUDA without Detectron2's compiled ops.

Parameter layout (matches AdelaiDet's ``DFConv2d`` with modulation, so its checkpoints load):
    offset.weight (3*k*k, C_in, k, k), offset.bias: predicts 2*k*k offsets (dy, dx pairs
        per kernel position, the layout torchvision and the DCN CUDA kernels share)
        followed by k*k modulation logits;
    conv.weight (C_out, C_in, k, k), conv.bias: the deformable convolution's filters.
"""
import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

__all__ = ["ModulatedDeformConv2d"]


class ModulatedDeformConv2d(nn.Module):
    """3x3 (or k x k) DCNv2, stride 1, 'same' padding, one offset group.

    Shapes: input (N, C_in, H, W) -> output (N, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.kernel_size = kernel_size
        self.padding = (kernel_size - 1) // 2
        kk = kernel_size * kernel_size
        self.offset = nn.Conv2d(in_channels, 3 * kk, kernel_size, padding=self.padding)
        # Holds the deformable filters; its own forward (a regular conv) is never used.
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=self.padding, bias=bias)
        # Zero offsets and mask logits: starts as a regular conv with mask 0.5.
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        kk = self.kernel_size * self.kernel_size
        offset_mask = self.offset(x)
        offset = offset_mask[:, : 2 * kk]
        mask = torch.sigmoid(offset_mask[:, 2 * kk :])
        return deform_conv2d(
            x, offset, self.conv.weight, self.conv.bias, padding=(self.padding, self.padding), mask=mask
        )
