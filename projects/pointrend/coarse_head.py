"""PointRend's lightweight coarse mask head (paper, section 4, "Lightweight, coarse mask
prediction head").

Shape shorthand:
    R: regions (boxes), C: input channels, S: pooled side (POOLER_RESOLUTION, 14)
    D: conv width (CONV_DIM), K: classes, M: output side (OUTPUT_SIDE_RESOLUTION, 7)

Pooled (R, C, S, S) features -> [1x1 conv to D channels + ReLU, only when C > D]
-> 2x2 stride-2 conv + ReLU -> (R, D, S/2, S/2) -> NUM_FC fully connected layers of FC_DIM
with ReLU -> linear -> (R, K, M, M) mask logits.

Parameter names (``reduce_channel_dim_conv``, ``reduce_spatial_dim_conv``, ``fc1``...,
``prediction``) are those of Detectron2's PointRend checkpoints, so they load unchanged.
"""
from typing import List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from torch import nn
from torch.nn import functional as F

__all__ = ["PointRendCoarseMaskHead"]


class PointRendCoarseMaskHead(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        pooler_resolution: int,
        conv_dim: int,
        fc_dims: List[int],
        num_classes: int,
        output_side: int,
    ):
        """
        Args:
            in_channels: C.
            pooler_resolution: S, side of the pooled input (even).
            conv_dim: D.
            fc_dims: widths of the hidden fully connected layers (at least one).
            num_classes: K (1 for a class-agnostic mask).
            output_side: M.
        """
        super().__init__()
        if pooler_resolution % 2:
            raise ValueError(
                f"ROI_MASK_HEAD.POOLER_RESOLUTION must be even for the stride-2 conv, got {pooler_resolution}"
            )
        if not fc_dims:
            raise ValueError("POINTREND.COARSE_HEAD.NUM_FC must be >= 1")
        self.output_shape = (num_classes, output_side, output_side)
        self.convs = []
        if in_channels > conv_dim:
            self.reduce_channel_dim_conv = nn.Conv2d(in_channels, conv_dim, kernel_size=1)
            self.convs.append(self.reduce_channel_dim_conv)
            in_channels = conv_dim
        self.reduce_spatial_dim_conv = nn.Conv2d(in_channels, conv_dim, kernel_size=2, stride=2)
        self.convs.append(self.reduce_spatial_dim_conv)
        for conv in self.convs:
            weight_init.c2_msra_fill(conv)

        dim = conv_dim * (pooler_resolution // 2) ** 2
        self.fcs = []
        for i, width in enumerate(fc_dims):
            fc = nn.Linear(dim, width)
            weight_init.c2_xavier_fill(fc)
            self.add_module(f"fc{i + 1}", fc)
            self.fcs.append(fc)
            dim = width
        self.prediction = nn.Linear(dim, num_classes * output_side * output_side)
        nn.init.normal_(self.prediction.weight, std=0.001)
        nn.init.constant_(self.prediction.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, in_channels, num_classes):
        ch = cfg.MODEL.POINTREND.COARSE_HEAD
        return {
            "in_channels": in_channels,
            "pooler_resolution": cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION,
            "conv_dim": cfg.MODEL.ROI_MASK_HEAD.CONV_DIM,
            "fc_dims": [ch.FC_DIM] * ch.NUM_FC,
            "num_classes": num_classes,
            "output_side": ch.OUTPUT_SIDE_RESOLUTION,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (R, C, S, S) pooled region features.

        Returns:
            (R, K, M, M) coarse mask logits.
        """
        for conv in self.convs:
            x = F.relu(conv(x))
        x = torch.flatten(x, 1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.prediction(x).view(x.shape[0], *self.output_shape)
