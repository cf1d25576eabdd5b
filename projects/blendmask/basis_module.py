"""BlendMask's bottom module: K bases at 1/4 of the input from FPN features, and the
optional auxiliary semantic segmentation loss.

Shape shorthand:
    N: images, C: FPN channels, Hs, Ws: size of IN_FEATURES[0] (stride s, 8 for P3),
    K: bases (4), D: CONVS_DIM (128), Q: NUM_CLASSES + 1 (background first).

Parameter names follow AdelaiDet's ``ProtoNet`` (``refine.{i}``, ``tower.{i}``,
``seg_head.{i}``) so its checkpoints map by prefix (docs/condinst_blendmask.md).
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import ShapeSpec, get_norm

from d2seg.condinst.mask_branch import conv_norm_relu

__all__ = ["BasisModule", "painted_semantic_targets"]


def painted_semantic_targets(bitmasks: List[Tensor], classes: List[Tensor], stride: int) -> Tensor:
    """(N, Hs, Ws) AdelaiDet's basis labels: each image's instances painted in order (class
    + 1, later ones on top, 0 elsewhere) and read at the top-left pixel of every
    ``stride`` x ``stride`` cell (nearest-neighbour downsampling).

    Args:
        bitmasks: N tensors (G, H, W) at the padded input size.
        classes: N tensors (G,).
    """
    out = []
    for masks, cls in zip(bitmasks, classes):
        m = masks[:, ::stride, ::stride].bool()
        t = torch.zeros(m.shape[-2:], dtype=torch.long, device=masks.device)
        for g in range(m.shape[0]):
            t[m[g]] = cls[g].long() + 1
        out.append(t)
    return torch.stack(out)


class BasisModule(nn.Module):
    """features {name: (N, C, Hl, Wl)} -> bases (N, K, 2*Hs, 2*Ws) and a loss dict."""

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: List[str],
        num_bases: int = 4,
        channels: int = 128,
        num_convs: int = 3,
        norm: str = "BN",
        loss_on: bool = False,
        num_classes: int = 80,
        loss_weight: float = 0.3,
    ):
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.BASIS_MODULE.IN_FEATURES {missing} are not backbone outputs ({sorted(input_shape)})."
            )
        self.in_features = list(in_features)
        self.in_stride = input_shape[in_features[0]].stride
        self.out_stride = self.in_stride // 2
        self.refine = nn.ModuleList(conv_norm_relu(input_shape[f].channels, channels, norm) for f in in_features)
        tower = [conv_norm_relu(channels, channels, norm) for _ in range(num_convs)]
        tower.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        tower.append(conv_norm_relu(channels, channels, norm))
        tower.append(nn.Conv2d(channels, num_bases, 1))
        self.tower = nn.Sequential(*tower)
        self.loss_on = loss_on
        if loss_on:
            c = input_shape[in_features[0]].channels
            norm_sem = norm or "BN"
            self.seg_head = nn.Sequential(
                nn.Conv2d(c, channels, 3, padding=1, bias=False), get_norm(norm_sem, channels), nn.ReLU(),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False), get_norm(norm_sem, channels), nn.ReLU(),
                nn.Conv2d(channels, num_classes + 1, 1),
            )
            self.loss_weight = loss_weight

    def forward(
        self, features: Dict[str, Tensor], sem_targets: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """
        Args:
            features: backbone outputs.
            sem_targets: optional (N, Hs, Ws) long class + 1 per pixel (0: background).
        Returns:
            bases (N, K, 2*Hs, 2*Ws) and {"loss_basis_sem"} when the loss is on and
            targets are given.
        """
        x = None
        for f, refine in zip(self.in_features, self.refine):
            y = refine(features[f])
            x = y if x is None else x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        bases = self.tower(x)
        losses = {}
        if self.training and self.loss_on and sem_targets is not None:
            logits = self.seg_head(features[self.in_features[0]])
            losses["loss_basis_sem"] = F.cross_entropy(logits, sem_targets) * self.loss_weight
        return bases, losses
