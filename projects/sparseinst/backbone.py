"""Backbones for SparseInst's paper variants, runnable without detectron2._C.

- ``build_sparseinst_resnet_backbone``: Detectron2's ResNet (R-50, R-50-DCN). Deformable
  stages (MODEL.RESNETS.DEFORM_ON_PER_STAGE) use torchvision's ``deform_conv2d`` when
  Detectron2's compiled op is missing; parameter names are Detectron2's (``conv2_offset``,
  ``conv2.weight``, ``conv2.norm``), so its DCN checkpoints load unchanged.
- ``build_sparseinst_resnet_vd_backbone``: ResNet-D ("R-50-d", Bag of Tricks): deep
  3x3 stem and average-pool shortcuts, optionally with DCNv1 in the 3x3 convs, named as
  timm's ``resnet50d`` (``conv1.0``, ``bn1``, ``layer1.0.conv2``, ``layer2.0.downsample.1``,
  ``conv2_offset``), the layout of hustvl/SparseInst's R-50-d checkpoints.

Shapes: B batch, C channels, H x W spatial size; k = 3 kernel.
"""
import contextlib
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone import resnet as d2_resnet


class TorchvisionDeformConv(nn.Module):
    """Deformable 3x3 conv with Detectron2's ``DeformConv`` interface and parameter names,
    computed by ``torchvision.ops.deform_conv2d`` (CPU and CUDA, with autograd).

    forward(x (B, C, H, W), offset (B, 2*G*k*k, H', W')) -> (B, C_out, H', W'); offsets are
    (dy, dx) pairs per kernel tap, the layout of Detectron2's and torchvision's ops.
    """

    modulated = False

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deformable_groups=1, bias=False, norm=None, activation=None):
        super().__init__()
        k = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        self.norm = norm
        self.activation = activation

    def forward(self, x, offset, mask=None):
        out = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                            dilation=self.dilation, mask=mask)
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out


class TorchvisionModulatedDeformConv(TorchvisionDeformConv):
    """DCNv2 counterpart: forward(x, offset, mask (B, G*k*k, H', W'))."""

    modulated = True

    def __init__(self, *args, bias=True, **kwargs):
        super().__init__(*args, bias=bias, **kwargs)


def _detectron2_deform_ops_available() -> bool:
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _torchvision_deform_ops():
    """Within this block Detectron2's ResNet builds its deformable blocks from
    :class:`TorchvisionDeformConv` (only when detectron2._C is missing)."""
    if _detectron2_deform_ops_available():
        yield
        return
    saved = d2_resnet.DeformConv, d2_resnet.ModulatedDeformConv
    d2_resnet.DeformConv, d2_resnet.ModulatedDeformConv = TorchvisionDeformConv, TorchvisionModulatedDeformConv
    try:
        yield
    finally:
        d2_resnet.DeformConv, d2_resnet.ModulatedDeformConv = saved


@BACKBONE_REGISTRY.register()
def build_sparseinst_resnet_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ``build_resnet_backbone``, with deformable stages that run without
    detectron2._C. Same config keys (MODEL.RESNETS.*), same parameter names."""
    with _torchvision_deform_ops():
        return d2_resnet.build_resnet_backbone(cfg, input_shape)


# --------------------------------------------------------------------------- ResNet-D
def _norm(norm: str, channels: int) -> nn.Module:
    """A norm layer for ResNet-D; "FrozenBN", "BN", "SyncBN", "GN", ... as Detectron2's get_norm."""
    if not norm:
        raise ValueError("MODEL.RESNETS.NORM must name a norm for the ResNet-D backbone")
    return get_norm(norm, channels)


class VdBottleneck(nn.Module):
    """ResNet bottleneck (stride in the 3x3 conv), conv-norm-act, timm parameter names.
    With ``deform`` the 3x3 conv is deformable (DCNv1, offsets from ``conv2_offset``)."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=None, norm="FrozenBN", deform=False):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = _norm(norm, planes)
        self.deform = deform
        if deform:
            self.conv2_offset = nn.Conv2d(planes, 18, 3, stride=stride, padding=1)
            nn.init.zeros_(self.conv2_offset.weight)
            nn.init.zeros_(self.conv2_offset.bias)
            self.conv2 = TorchvisionDeformConv(planes, planes, 3, stride=stride, padding=1)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = _norm(norm, out_channels)
        self.downsample = downsample
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if isinstance(self.bn3, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.zeros_(self.bn3.weight)  # zero-init the last norm of each residual (timm default)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        if self.deform:
            out = self.conv2(out, self.conv2_offset(out))
        else:
            out = self.conv2(out)
        out = F.relu(self.bn2(out))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def _avg_down(in_channels, out_channels, stride, norm) -> nn.Sequential:
    """ResNet-D shortcut: 2x2 average pool (when strided), 1x1 conv, norm (indices 0, 1, 2)."""
    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
    return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), _norm(norm, out_channels))


class ResNetVd(Backbone):
    """ResNet-D. (B, 3, H, W) -> {"res2": 1/4, "res3": 1/8, "res4": 1/16, "res5": 1/32} (those in
    ``out_features``), channels 256, 512, 1024, 2048.

    Stem ``conv1`` = Sequential(3x3/2 conv, norm, ReLU, 3x3 conv, norm, ReLU, 3x3 conv), then
    ``bn1``, ReLU and a 3x3/2 max pool; stages ``layer1`` ... ``layer4``.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), stem_width: int = 32, norm: str = "FrozenBN",
                 deform_on_per_stage: Sequence[bool] = (False,) * 4, out_features: List[str] = ("res3", "res4", "res5"),
                 freeze_at: int = 0):
        super().__init__()
        inplanes = stem_width * 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False), _norm(norm, stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False), _norm(norm, stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, inplanes, 3, padding=1, bias=False),
        )
        self.bn1 = _norm(norm, inplanes)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        names = ["res2", "res3", "res4", "res5"]
        for f in out_features:
            if f not in names:
                raise ValueError(f"MODEL.RESNETS.OUT_FEATURES has {f!r}; ResNet-D produces {names}")
        self._out_features = list(out_features)
        self._out_feature_strides, self._out_feature_channels = {}, {}
        for idx, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if idx == 0 else 2
            out_channels = planes * VdBottleneck.expansion
            stage = [VdBottleneck(inplanes, planes, stride, _avg_down(inplanes, out_channels, stride, norm), norm,
                                  deform_on_per_stage[idx])]
            stage += [VdBottleneck(out_channels, planes, 1, None, norm, deform_on_per_stage[idx])
                      for _ in range(blocks - 1)]
            self.add_module(f"layer{idx + 1}", nn.Sequential(*stage))
            inplanes = out_channels
            self._out_feature_strides[names[idx]] = 4 * 2 ** idx
            self._out_feature_channels[names[idx]] = out_channels
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int):
        """freeze_at 1: the stem; k >= 2: the stem and layer1 ... layer(k-1) (as Detectron2)."""
        if freeze_at <= 0:
            return
        frozen = [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, freeze_at)]
        for m in frozen:
            for p in m.parameters():
                p.requires_grad = False
            FrozenBatchNorm2d.convert_frozen_batchnorm(m)

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"ResNetVd takes (B, C, H, W) inputs, got shape {tuple(x.shape)}")
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        outputs = {}
        for idx, name in enumerate(["res2", "res3", "res4", "res5"]):
            x = getattr(self, f"layer{idx + 1}")(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self):
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}


@BACKBONE_REGISTRY.register()
def build_sparseinst_resnet_vd_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-D from MODEL.RESNETS.{DEPTH (50, 101), NORM, DEFORM_ON_PER_STAGE, OUT_FEATURES,
    VD_STEM_WIDTH} and MODEL.BACKBONE.FREEZE_AT."""
    r = cfg.MODEL.RESNETS
    layers = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}.get(r.DEPTH)
    if layers is None:
        raise ValueError(f"MODEL.RESNETS.DEPTH={r.DEPTH} is not supported by the ResNet-D backbone (50, 101, 152)")
    if input_shape.channels != 3:
        raise ValueError(f"ResNet-D takes 3-channel input, got {input_shape.channels}")
    if r.DEFORM_MODULATED:
        raise ValueError("MODEL.RESNETS.DEFORM_MODULATED is not supported by the ResNet-D backbone (DCNv1 only)")
    return ResNetVd(layers, r.VD_STEM_WIDTH, r.NORM, r.DEFORM_ON_PER_STAGE, r.OUT_FEATURES, cfg.MODEL.BACKBONE.FREEZE_AT)
