"""Instance context encoder (paper Sec. 3.3): a pyramid pooling module (PPM) on C5 and a
fusion of P3-P5 into one feature map at 1/8 of the input.

Shapes: B batch, C channels of the encoder (NUM_CHANNELS), H x W the 1/8 map,
h x w the 1/32 map (C5), s a PPM pool size.

Parameter names follow hustvl/SparseInst (``fpn_laterals``, ``fpn_outputs``,
``ppm.stages.<i>.1``, ``ppm.bottleneck``, ``fusion``) so its checkpoints load unchanged.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init

SPARSE_INST_ENCODER_REGISTRY = Registry("SPARSE_INST_ENCODER")
SPARSE_INST_ENCODER_REGISTRY.__doc__ = "SparseInst encoders: backbone features -> one 1/8 map."


def _pool_matrix(in_size, out_size: int, dtype, device) -> torch.Tensor:
    """(out_size, in_size) averaging matrix with PyTorch's adaptive-pool bins.

    Bin i covers [floor(i * in / out), ceil((i + 1) * in / out)), exactly as
    ``F.adaptive_avg_pool2d``; the bins may overlap when ``out`` does not divide ``in``.
    ``in_size`` is an int or a 0-dim integer tensor (the map size while tracing an ONNX
    export, so that the bins follow the input size in the exported graph).
    """
    j = torch.arange(in_size, device=device)  # (in,)
    i = torch.arange(out_size, device=device)  # (out,)
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size  # ceil
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def adaptive_avg_pool2d_exportable(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for any input size, as two matmuls.

    ONNX has no adaptive pooling with non-dividing sizes; hustvl/SparseInst's exporter
    substitutes a fixed AvgPool2d whose windows differ from the adaptive bins when the
    size does not divide (a cause of its ONNX/PyTorch mismatches). Averaging matrices
    reproduce the bins exactly, and are computed from the map size inside an exported graph
    (dynamic input sizes). x: (B, C, h, w) -> (B, C, size, size).
    """
    hw = torch._shape_as_tensor(x)[-2:] if torch.jit.is_tracing() else x.shape[-2:]
    ph = _pool_matrix(hw[0], size, x.dtype, x.device)  # (s, h)
    pw = _pool_matrix(hw[1], size, x.dtype, x.device)  # (s, w)
    return torch.matmul(torch.matmul(ph, x), pw.t())


class PyramidPoolingModule(nn.Module):
    """PPM (Zhao et al., PSPNet): pooled context at several grid sizes, 1x1 conv + ReLU,
    upsampled, concatenated with the input and fused by a 1x1 conv + ReLU.
    (B, C, h, w) -> (B, C, h, w).
    """

    def __init__(self, in_channels: int, channels: int, pool_sizes: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.pool_sizes = tuple(int(s) for s in pool_sizes)
        # Sequential(pool, conv) so the conv is ``stages.<i>.1`` as in the reference.
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), Conv2d(in_channels, channels, 1)) for s in self.pool_sizes]
        )
        self.bottleneck = Conv2d(in_channels + len(self.pool_sizes) * channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        exporting = torch.onnx.is_in_onnx_export()
        priors = []
        for s, stage in zip(self.pool_sizes, self.stages):
            pooled = adaptive_avg_pool2d_exportable(x, s) if exporting else stage[0](x)
            prior = F.relu(stage[1](pooled))
            priors.append(F.interpolate(prior, size=size, mode="bilinear", align_corners=False))
        return F.relu(self.bottleneck(torch.cat(priors + [x], dim=1)))


@SPARSE_INST_ENCODER_REGISTRY.register()
class InstanceContextEncoder(nn.Module):
    """C3, C4, C5 -> one (B, C, H, W) map at the stride of C3 (1/8).

    Top-down path: lateral 1x1 convs; PPM on the C5 lateral; nearest 2x upsampling and
    addition; a 3x3 output conv per level. The three outputs P3, P4, P5 are upsampled to
    P3's size, concatenated and fused by a 1x1 conv.
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], in_features: List[str], num_channels: int = 256,
                 pool_sizes: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        for f in in_features:
            if f not in input_shape:
                raise ValueError(
                    f"MODEL.SPARSE_INST.ENCODER.IN_FEATURES names {f!r}, which the backbone does not "
                    f"produce (it produces {sorted(input_shape)}); check MODEL.RESNETS.OUT_FEATURES"
                )
        self.in_features = list(in_features)
        in_channels = [input_shape[f].channels for f in self.in_features]
        # Index 0 is the coarsest level (C5), as in the reference.
        self.fpn_laterals = nn.ModuleList([Conv2d(c, num_channels, 1) for c in reversed(in_channels)])
        self.fpn_outputs = nn.ModuleList(
            [Conv2d(num_channels, num_channels, 3, padding=1) for _ in in_channels]
        )
        self.ppm = PyramidPoolingModule(num_channels, num_channels // 4, pool_sizes)
        self.fusion = nn.Conv2d(num_channels * len(in_channels), num_channels, 1)
        for m in list(self.fpn_laterals) + list(self.fpn_outputs):
            weight_init.c2_xavier_fill(m)
        weight_init.c2_msra_fill(self.fusion)
        self.out_channels = num_channels
        self.out_stride = input_shape[self.in_features[0]].stride

    @classmethod
    def from_config(cls, cfg, input_shape):
        enc = cfg.MODEL.SPARSE_INST.ENCODER
        return cls(input_shape, enc.IN_FEATURES, enc.NUM_CHANNELS, enc.PPM_POOL_SIZES)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        feats = [features[f] for f in self.in_features][::-1]  # coarsest first
        prev = self.ppm(self.fpn_laterals[0](feats[0]))
        outputs = [self.fpn_outputs[0](prev)]
        for feat, lateral, output in zip(feats[1:], self.fpn_laterals[1:], self.fpn_outputs[1:]):
            lat = lateral(feat)
            prev = lat + F.interpolate(prev, size=lat.shape[-2:], mode="nearest")
            outputs.insert(0, output(prev))
        size = outputs[0].shape[-2:]
        fused = [outputs[0]] + [
            F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outputs[1:]
        ]
        return self.fusion(torch.cat(fused, dim=1))


def build_sparse_inst_encoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    name = cfg.MODEL.SPARSE_INST.ENCODER.NAME
    if name not in SPARSE_INST_ENCODER_REGISTRY:
        raise KeyError(f"MODEL.SPARSE_INST.ENCODER.NAME={name!r} is not a registered SparseInst encoder")
    return SPARSE_INST_ENCODER_REGISTRY.get(name).from_config(cfg, input_shape)
