"""The FCOS head: a classification tower and a box tower shared across FPN levels.

Shape shorthand in this module:
    N: images, C: FPN channels, K: foreground classes, L: levels, Hl, Wl: size of level l
    D: channels of the optional ``top_module`` output (a mask method's per-location vector)

Each tower is ``num_convs`` x (3x3 conv, GroupNorm(32), ReLU); the last conv may be a
modulated deformable conv. ``cls_logits`` (K) sits on the cls tower; ``bbox_pred`` (4) and
``ctrness`` (1) sit on the box tower (improved FCOS). The regression output is multiplied
by a learnable per-level scalar and passed through ReLU; it is the (l, t, r, b) distance
divided by the level's stride.

Module names equal the public AdelaiDet FCOS head (``share_tower``, ``cls_tower``,
``bbox_tower``, ``cls_logits``, ``bbox_pred``, ``ctrness``, ``scales.<l>.scale``), with
the same Sequential indices (conv, norm, relu per layer), so its weights load unchanged.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deform_conv import ModulatedDeformConv2d

__all__ = ["Scale", "FCOSHead", "FCOSHeadOutputs"]


class Scale(nn.Module):
    """Multiplies its input by one learnable scalar (parameter ``scale``, shape (1,))."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


@dataclass
class FCOSHeadOutputs:
    """Per-level raw outputs of :class:`FCOSHead` (lists of L tensors).

    Attributes:
        logits: (N, K, Hl, Wl) classification logits.
        bbox_reg: (N, 4, Hl, Wl) (l, t, r, b) / stride, >= 0.
        ctrness: (N, 1, Hl, Wl) centerness logits.
        top_feats: (N, D, Hl, Wl) ``top_module(box tower output)``, or None.
        cls_towers: (N, C, Hl, Wl) cls tower outputs, or None unless requested.
        bbox_towers: (N, C, Hl, Wl) box tower outputs, or None unless requested.
    """

    logits: List[Tensor]
    bbox_reg: List[Tensor]
    ctrness: List[Tensor]
    top_feats: Optional[List[Tensor]] = None
    cls_towers: Optional[List[Tensor]] = None
    bbox_towers: Optional[List[Tensor]] = None


def _make_tower(num_convs: int, channels: int, norm: str, deformable_last: bool) -> nn.Sequential:
    layers = []
    for i in range(num_convs):
        if deformable_last and i == num_convs - 1:
            layers.append(ModulatedDeformConv2d(channels, channels, 3, bias=True))
        else:
            layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=True))
        if norm == "GN":
            layers.append(nn.GroupNorm(32, channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Towers and predictors of FCOS, applied with the same weights to every level."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        num_cls_convs: int = 4,
        num_box_convs: int = 4,
        num_share_convs: int = 0,
        norm: str = "GN",
        use_scale: bool = True,
        use_deformable: bool = False,
        prior_prob: float = 0.01,
    ):
        """
        Args:
            in_channels: C, channels of every FPN level.
            num_classes: K.
            num_levels: L, number of levels (one ``Scale`` each).
            num_cls_convs, num_box_convs, num_share_convs: tower depths (the shared tower
                runs before both and is empty in FCOS).
            norm: "GN" or "none"/"" (no normalisation).
            use_scale: learnable per-level scalar on the regression output.
            use_deformable: DCNv2 as the last conv of the cls and box towers.
            prior_prob: initial foreground probability of the classifier (focal loss init).
        """
        super().__init__()
        norm = "" if norm in (None, "none", "") else norm
        if norm not in ("", "GN"):
            raise ValueError(f"MODEL.FCOS.NORM must be 'GN' or 'none', got {norm!r}.")
        if norm == "GN" and in_channels % 32 != 0:
            raise ValueError(
                f"MODEL.FCOS.NORM='GN' uses 32 groups, so the FPN channels "
                f"(MODEL.FPN.OUT_CHANNELS={in_channels}) must be a multiple of 32."
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.share_tower = _make_tower(num_share_convs, in_channels, norm, False)
        self.cls_tower = _make_tower(num_cls_convs, in_channels, norm, use_deformable)
        self.bbox_tower = _make_tower(num_box_convs, in_channels, norm, use_deformable)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)]) if use_scale else None

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0.0)
        for m in self.modules():
            if isinstance(m, ModulatedDeformConv2d):  # offsets start at zero
                nn.init.zeros_(m.offset.weight)
                nn.init.zeros_(m.offset.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(
        self,
        features: List[Tensor],
        top_module: Optional[Callable[[Tensor], Tensor]] = None,
        yield_towers: bool = False,
    ) -> FCOSHeadOutputs:
        """
        Args:
            features: L tensors (N, C, Hl, Wl), the FPN levels in ``IN_FEATURES`` order.
            top_module: optional module applied to each level's box tower output,
                (N, C, Hl, Wl) -> (N, D, Hl, Wl); the extension point for mask methods.
            yield_towers: also return the tower outputs.
        """
        if self.scales is not None and len(features) != len(self.scales):
            raise ValueError(f"FCOSHead built for {len(self.scales)} levels, got {len(features)}.")
        out = FCOSHeadOutputs([], [], [], [] if top_module is not None else None,
                              [] if yield_towers else None, [] if yield_towers else None)
        for lvl, x in enumerate(features):
            x = self.share_tower(x)
            cls_t = self.cls_tower(x)
            box_t = self.bbox_tower(x)
            out.logits.append(self.cls_logits(cls_t))
            out.ctrness.append(self.ctrness(box_t))
            reg = self.bbox_pred(box_t)
            if self.scales is not None:
                reg = self.scales[lvl](reg)
            out.bbox_reg.append(F.relu(reg))
            if top_module is not None:
                out.top_feats.append(top_module(box_t))
            if yield_towers:
                out.cls_towers.append(cls_t)
                out.bbox_towers.append(box_t)
        return out
