"""SOLO's heads: the category branch and the three ways of making masks.

Shape shorthand:
    N: images          L: levels          S: a level's grid size     C: classes
    D: tower channels  E: mask feature channels (= SOLOv2 kernel length)
    h, w: a level's feature size (padded image / stride); masks of SOLO and Decoupled SOLO
        come out at (2h, 2w); SOLOv2's unified mask feature at (Hp/4, Wp/4).

Module names follow AdelaiDet's SOLOv2 (``ins_head.cate_tower``, ``ins_head.kernel_tower``,
``ins_head.cate_pred``, ``ins_head.kernel_pred``, ``mask_head.convs_all_levels``,
``mask_head.conv_pred``) so its checkpoints load without renaming; the SOLO and Decoupled
SOLO mask branches (``mask_tower``/``mask_pred``, ``mask_tower_x``/``_y`` ...) follow the
same pattern (docs/solo.md has the mapping to mmdetection's names).
"""
import math
from typing import List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

__all__ = [
    "coord_features",
    "conv_tower",
    "SOLOInsHead",
    "DecoupledSOLOInsHead",
    "SOLOv2InsHead",
    "SOLOv2MaskHead",
]


def coord_features(x):
    """CoordConv channels for a feature map.

    Args:
        x (Tensor): (N, *, H, W).
    Returns:
        Tensor: (N, 2, H, W): x then y, each spanning [-1, 1].
    """
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy])[None].expand(n, -1, -1, -1)


def _norm_layer(norm, channels):
    if norm == "GN":
        return nn.GroupNorm(32 if channels % 32 == 0 else math.gcd(32, channels), channels)
    if norm in ("none", "", None):
        return None
    raise ValueError(f"MODEL.SOLO.NORM must be 'GN' or 'none', got {norm!r}")


def conv_tower(in_channels, channels, num_convs, norm):
    """``num_convs`` x (3x3 conv, norm, ReLU) as one Sequential (indices 0, 1, 2, 3, ...)."""
    layers = []
    for i in range(num_convs):
        n = _norm_layer(norm, channels)
        layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1,
                                bias=n is None))
        if n is not None:
            layers.append(n)
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _init_convs(modules, std=0.01):
    for m in modules:
        for layer in m.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=std)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0.0)


def _ins_head_config(cfg, input_shapes):
    c = cfg.MODEL.SOLO
    channels = {s.channels for s in input_shapes}
    if len(channels) != 1:
        raise ValueError(f"MODEL.SOLO.INSTANCE_IN_FEATURES must all have the same number of "
                         f"channels, got {sorted(channels)}")
    in_ch = channels.pop()
    if in_ch != c.INSTANCE_IN_CHANNELS:
        raise ValueError(f"MODEL.SOLO.INSTANCE_IN_CHANNELS={c.INSTANCE_IN_CHANNELS} but the "
                         f"backbone's instance features have {in_ch} channels")
    return {
        "in_channels": in_ch,
        "channels": c.INSTANCE_CHANNELS,
        "num_convs": c.NUM_INSTANCE_CONVS,
        "num_classes": c.NUM_CLASSES,
        "num_grids": list(c.NUM_GRIDS),
        "norm": c.NORM,
        "prior_prob": c.PRIOR_PROB,
    }


class _CategoryBranch(nn.Module):
    """Category branch shared by all three: the level feature resized to S x S, a conv
    tower, and a 3x3 conv to C sigmoid logits per cell."""

    def __init__(self, *, in_channels, channels, num_convs, num_classes, num_grids, norm,
                 prior_prob):
        super().__init__()
        self.num_grids = num_grids
        self.num_classes = num_classes
        self.cate_tower = conv_tower(in_channels, channels, num_convs, norm)
        self.cate_pred = nn.Conv2d(channels, num_classes, 3, padding=1)

    def _init_category(self, prior_prob):
        _init_convs([self.cate_tower, self.cate_pred])
        nn.init.constant_(self.cate_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward_category(self, feature, level):
        """(N, D, h, w) -> (N, C, S, S) logits."""
        S = self.num_grids[level]
        x = F.interpolate(feature, size=(S, S), mode="bilinear", align_corners=False)
        return self.cate_pred(self.cate_tower(x))


class SOLOInsHead(_CategoryBranch):
    """Vanilla SOLO: a mask branch with S^2 output channels per level, one per cell, on
    the level feature with CoordConv input, upsampled x2 (SOLO, Sec. 3.2)."""

    @configurable
    def __init__(self, **kw):
        super().__init__(**kw)
        ch = kw["channels"]
        self.mask_tower = conv_tower(kw["in_channels"] + 2, ch, kw["num_convs"], kw["norm"])
        self.mask_pred = nn.ModuleList([nn.Conv2d(ch, S * S, 1) for S in self.num_grids])
        _init_convs([self.mask_tower, self.mask_pred])
        self._init_category(kw["prior_prob"])

    @classmethod
    def from_config(cls, cfg, input_shapes):
        return _ins_head_config(cfg, input_shapes)

    def forward(self, features: List[torch.Tensor]):
        """
        Args:
            features: L tensors (N, D_in, h_l, w_l).
        Returns:
            cate_preds: L tensors (N, C, S, S) logits.
            mask_preds: L tensors (N, S^2, 2h_l, 2w_l) logits; channel row * S + col.
        """
        cate, masks = [], []
        for lvl, f in enumerate(features):
            cate.append(self.forward_category(f, lvl))
            m = self.mask_tower(torch.cat([f, coord_features(f)], dim=1))
            m = F.interpolate(m, scale_factor=2, mode="bilinear", align_corners=False)
            masks.append(self.mask_pred[lvl](m))
        return cate, masks

    @staticmethod
    def level_mask_probs(mask_preds, level, img_inds, cells, num_grid):
        """(R,) image and cell indices -> (R, 2h, 2w) mask probabilities."""
        return mask_preds[level][img_inds, cells].sigmoid()


class DecoupledSOLOInsHead(_CategoryBranch):
    """Decoupled SOLO: an X branch and a Y branch with S channels each; the mask of cell
    (i, j) is sigmoid(X_j) * sigmoid(Y_i) (SOLO, Sec. 3.4). The X branch sees the x
    coordinate, the Y branch the y coordinate."""

    @configurable
    def __init__(self, **kw):
        super().__init__(**kw)
        ch, n, norm = kw["channels"], kw["num_convs"], kw["norm"]
        self.mask_tower_x = conv_tower(kw["in_channels"] + 1, ch, n, norm)
        self.mask_tower_y = conv_tower(kw["in_channels"] + 1, ch, n, norm)
        self.mask_pred_x = nn.ModuleList([nn.Conv2d(ch, S, 3, padding=1) for S in self.num_grids])
        self.mask_pred_y = nn.ModuleList([nn.Conv2d(ch, S, 3, padding=1) for S in self.num_grids])
        _init_convs([self.mask_tower_x, self.mask_tower_y, self.mask_pred_x, self.mask_pred_y])
        self._init_category(kw["prior_prob"])

    @classmethod
    def from_config(cls, cfg, input_shapes):
        return _ins_head_config(cfg, input_shapes)

    def forward(self, features: List[torch.Tensor]):
        """
        Args:
            features: L tensors (N, D_in, h_l, w_l).
        Returns:
            cate_preds: L tensors (N, C, S, S) logits.
            mask_preds: L pairs (x, y) of (N, S, 2h_l, 2w_l) logits; x channel = column,
                y channel = row.
        """
        cate, masks = [], []
        for lvl, f in enumerate(features):
            cate.append(self.forward_category(f, lvl))
            coords = coord_features(f)
            x = self.mask_tower_x(torch.cat([f, coords[:, :1]], dim=1))
            y = self.mask_tower_y(torch.cat([f, coords[:, 1:]], dim=1))
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            masks.append((self.mask_pred_x[lvl](x), self.mask_pred_y[lvl](y)))
        return cate, masks

    @staticmethod
    def level_mask_probs(mask_preds, level, img_inds, cells, num_grid):
        """(R,) image and cell indices -> (R, 2h, 2w) mask probabilities."""
        x, y = mask_preds[level]
        rows, cols = cells // num_grid, cells % num_grid
        return x[img_inds, cols].sigmoid() * y[img_inds, rows].sigmoid()


class SOLOv2InsHead(_CategoryBranch):
    """SOLOv2's instance branch: per cell, C category logits and an E-long dynamic 1x1
    mask kernel; the kernel branch sees CoordConv input, the category branch does not."""

    @configurable
    def __init__(self, *, num_kernels, use_coord_conv, **kw):
        super().__init__(**kw)
        ch = kw["channels"]
        self.use_coord_conv = use_coord_conv
        extra = 2 if use_coord_conv else 0
        self.kernel_tower = conv_tower(kw["in_channels"] + extra, ch, kw["num_convs"], kw["norm"])
        self.kernel_pred = nn.Conv2d(ch, num_kernels, 3, padding=1)
        _init_convs([self.kernel_tower, self.kernel_pred])
        self._init_category(kw["prior_prob"])

    @classmethod
    def from_config(cls, cfg, input_shapes):
        out = _ins_head_config(cfg, input_shapes)
        out["num_kernels"] = cfg.MODEL.SOLO.NUM_KERNELS
        out["use_coord_conv"] = cfg.MODEL.SOLO.USE_COORD_CONV
        return out

    def forward(self, features: List[torch.Tensor]):
        """
        Args:
            features: L tensors (N, D_in, h_l, w_l).
        Returns:
            cate_preds: L tensors (N, C, S, S) logits.
            kernel_preds: L tensors (N, E, S, S).
        """
        cate, kernels = [], []
        for lvl, f in enumerate(features):
            S = self.num_grids[lvl]
            cate.append(self.forward_category(f, lvl))
            k = torch.cat([f, coord_features(f)], dim=1) if self.use_coord_conv else f
            k = F.interpolate(k, size=(S, S), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_pred(self.kernel_tower(k)))
        return cate, kernels


class SOLOv2MaskHead(nn.Module):
    """SOLOv2's unified mask feature: every input level goes through (3x3 conv, norm,
    ReLU, x2 upsample) until it reaches the first level's resolution, the results are
    summed, and a 1x1 conv (+ norm + ReLU) gives E channels. The last (coarsest) level
    gets CoordConv input."""

    @configurable
    def __init__(self, *, in_channels, channels, num_masks, num_levels, norm):
        super().__init__()
        self.num_levels = num_levels
        self.convs_all_levels = nn.ModuleList()
        for i in range(num_levels):
            level = nn.Sequential()
            for j in range(max(i, 1)):
                if j > 0:
                    cin = channels
                else:  # the coarsest level also takes the 2 CoordConv channels
                    cin = in_channels + (2 if i == num_levels - 1 and i > 0 else 0)
                n = _norm_layer(norm, channels)
                block = [nn.Conv2d(cin, channels, 3, padding=1, bias=n is None)]
                if n is not None:
                    block.append(n)
                block.append(nn.ReLU(inplace=False))
                level.add_module(f"conv{j}", nn.Sequential(*block))
                if i > 0:
                    level.add_module(f"upsample{j}", nn.Upsample(scale_factor=2, mode="bilinear",
                                                                 align_corners=False))
            self.convs_all_levels.append(level)
        n = _norm_layer(norm, num_masks)
        pred = [nn.Conv2d(channels, num_masks, 1, bias=n is None)]
        if n is not None:
            pred.append(n)
        pred.append(nn.ReLU(inplace=True))
        self.conv_pred = nn.Sequential(*pred)
        _init_convs([self.convs_all_levels, self.conv_pred])

    @classmethod
    def from_config(cls, cfg, input_shapes):
        c = cfg.MODEL.SOLO
        for f, s in zip(c.MASK_IN_FEATURES, input_shapes):
            if s.channels != c.MASK_IN_CHANNELS:
                raise ValueError(f"MODEL.SOLO.MASK_IN_CHANNELS={c.MASK_IN_CHANNELS} but feature "
                                 f"{f} has {s.channels} channels")
        if c.NUM_KERNELS != c.NUM_MASKS:
            raise ValueError(f"MODEL.SOLO.NUM_KERNELS ({c.NUM_KERNELS}) must equal NUM_MASKS "
                             f"({c.NUM_MASKS}) for 1x1 dynamic kernels")
        return {
            "in_channels": c.MASK_IN_CHANNELS,
            "channels": c.MASK_CHANNELS,
            "num_masks": c.NUM_MASKS,
            "num_levels": len(c.MASK_IN_FEATURES),
            "norm": c.NORM,
        }

    def forward(self, features: List[torch.Tensor]):
        """
        Args:
            features: levels (N, D_in, H_i, W_i), each half the size of the previous one.
        Returns:
            Tensor: (N, E, H_0, W_0) mask features.
        """
        if len(features) != self.num_levels:
            raise ValueError(f"SOLOv2MaskHead expects {self.num_levels} features "
                             f"(MODEL.SOLO.MASK_IN_FEATURES), got {len(features)}")
        out = self.convs_all_levels[0](features[0])
        for i in range(1, self.num_levels):
            f = features[i]
            if i == self.num_levels - 1:
                f = torch.cat([f, coord_features(f)], dim=1)
            y = self.convs_all_levels[i](f)
            if y.shape[-2:] != out.shape[-2:]:
                raise ValueError(f"mask feature level {i} upsamples to {tuple(y.shape[-2:])}, not "
                                 f"{tuple(out.shape[-2:])}: pad images to a multiple of the "
                                 f"coarsest stride (backbone size_divisibility)")
            out = out + y
        return self.conv_pred(out)
