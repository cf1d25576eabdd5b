"""PointRend's point head: a per-point MLP on fine-grained + coarse prediction features.

Shape shorthand:
    R: regions (boxes) or images, P: points per region
    Cf: fine-grained feature channels, K: classes (coarse prediction channels)
    D: hidden width (FC_DIM), Ko: output classes (K, or 1 when class-agnostic)

The MLP has NUM_FC hidden layers of width D with ReLU; the K coarse prediction features
are concatenated to the input of every layer (COARSE_PRED_EACH_LAYER, the paper's
design) and a linear predictor gives Ko logits per point.

Parameters are stored as kernel-1 ``nn.Conv1d`` (``fc1``...``fcL``, ``predictor``) so that
Detectron2's published PointRend checkpoints load unchanged; the computation itself is
done channels-last with one matrix product per layer and without concatenations: each
layer's weight is split into its part on the previous activations and its part on the
coarse features, and the coarse parts of all layers are applied in a single product.

At inference the first layer's fine-grained part can be applied to the feature MAP once
(:meth:`project_fine_features`) and then bilinearly sampled: sampling is linear, so
sample(W x) = W sample(x); this removes the widest per-point product from every
subdivision step (see mask_head.py).
"""
from typing import Optional

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn
from torch.nn import functional as F

__all__ = ["POINTREND_POINT_HEAD_REGISTRY", "PointRendMLPPointHead", "build_pointrend_point_head"]

POINTREND_POINT_HEAD_REGISTRY = Registry("D2SEG_POINTREND_POINT_HEAD")
POINTREND_POINT_HEAD_REGISTRY.__doc__ = """
d2seg's registry of PointRend point heads (separate from upstream's POINT_HEAD registry).
A head is built as ``obj(cfg, in_channels, num_classes)``.
"""


@POINTREND_POINT_HEAD_REGISTRY.register()
class PointRendMLPPointHead(nn.Module):
    """The paper's point head (upstream's ``StandardPointHead`` has the same parameters)."""

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        fc_dim: int = 256,
        num_fc: int = 3,
        cls_agnostic: bool = False,
        coarse_pred_each_layer: bool = True,
    ):
        """
        Args:
            in_channels: Cf, fine-grained feature channels (all IN_FEATURES together).
            num_classes: K, channels of the coarse prediction fed to the MLP.
            fc_dim, num_fc: width D and number of hidden layers.
            cls_agnostic: predict one mask logit per point instead of K.
            coarse_pred_each_layer: concatenate the coarse features to every layer's input
                (else only to the first).
        """
        super().__init__()
        if num_fc < 1:
            raise ValueError(f"POINTREND.POINT_HEAD.NUM_FC must be >= 1, got {num_fc}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.coarse_pred_each_layer = coarse_pred_each_layer
        self.num_fc = num_fc
        self.fc_layers = []
        dim_in = in_channels + num_classes
        for i in range(num_fc):
            fc = nn.Conv1d(dim_in, fc_dim, kernel_size=1)
            weight_init.c2_msra_fill(fc)
            self.add_module(f"fc{i + 1}", fc)
            self.fc_layers.append(fc)
            dim_in = fc_dim + (num_classes if coarse_pred_each_layer else 0)
        self.predictor = nn.Conv1d(dim_in, 1 if cls_agnostic else num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, in_channels, num_classes):
        ph = cfg.MODEL.POINTREND.POINT_HEAD
        return {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "fc_dim": ph.FC_DIM,
            "num_fc": ph.NUM_FC,
            "cls_agnostic": ph.CLS_AGNOSTIC_MASK,
            "coarse_pred_each_layer": ph.COARSE_PRED_EACH_LAYER,
        }

    # ---- weights split into (on previous activations | on coarse features) ----------
    def _layers(self):
        return list(self.fc_layers) + [self.predictor]

    def _split(self, layer_index: int):
        """(W_prev, W_coarse or None, bias) of layer ``layer_index`` (predictor = last)."""
        layer = self._layers()[layer_index]
        w = layer.weight.squeeze(2)
        takes_coarse = layer_index == 0 or self.coarse_pred_each_layer
        if not takes_coarse:
            return w, None, layer.bias
        k = self.num_classes
        return w[:, :-k], w[:, -k:], layer.bias

    def project_fine_features(self, features: torch.Tensor) -> torch.Tensor:
        """
        Apply the first layer's fine-grained weights to whole feature maps.

        Args:
            features: (N, Cf, H, W).

        Returns:
            (N, D, H, W); sampling it at a point equals the first layer's fine part at
            that point (bias excluded).
        """
        w_fine = self._split(0)[0]
        return F.conv2d(features, w_fine[:, :, None, None])

    def forward(
        self,
        fine_features: torch.Tensor,
        coarse_features: torch.Tensor,
        classes: Optional[torch.Tensor] = None,
        fine_is_projected: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            fine_features: (R, Cf, P) fine-grained features at the points, or (R, D, P)
                when ``fine_is_projected`` (sampled from :meth:`project_fine_features`).
            coarse_features: (R, K, P) coarse prediction at the points.
            classes: optional (R,) long; if given, only that class's logit is predicted.

        Returns:
            (R, Ko, P) point logits, or (R, 1, P) when ``classes`` is given.
        """
        R, K, P = coarse_features.shape
        fine = fine_features.transpose(0, 1).reshape(fine_features.shape[1], R * P)
        coarse = coarse_features.transpose(0, 1).reshape(K, R * P)
        out = self.forward_flat(fine, coarse, R, classes, fine_is_projected)
        return out.view(out.shape[0], R, P).transpose(0, 1)

    def forward_flat(
        self,
        fine: torch.Tensor,
        coarse: torch.Tensor,
        num_regions: int,
        classes: Optional[torch.Tensor] = None,
        fine_is_projected: bool = False,
    ) -> torch.Tensor:
        """
        The same on channel-first matrices (one column per point, R regions of P points
        each, region after region), the layout point sampling produces.

        Args:
            fine: (Cf, R*P), or (D, R*P) when ``fine_is_projected``.
            coarse: (K, R*P).
            num_regions: R.
            classes: optional (R,) long.

        Returns:
            (Ko, R*P) logits, or (1, R*P) when ``classes`` is given.
        """
        R = num_regions
        layers = self._layers()
        splits = [self._split(i) for i in range(len(layers))]
        x = fine

        # Coarse contributions (+ biases) of the hidden layers that take them, in one
        # product: (L*D, R*P), each layer's block a contiguous row range.
        takes = [i for i in range(len(layers) - 1) if splits[i][1] is not None]
        hidden_coarse = torch.addmm(
            torch.cat([splits[i][2] for i in takes])[:, None],
            torch.cat([splits[i][1] for i in takes], dim=0),
            coarse,
        )
        blocks, o = {}, 0
        for i in takes:
            d = splits[i][0].shape[0]
            blocks[i] = hidden_coarse[o:o + d]
            o += d

        for i in range(len(layers) - 1):
            w_prev, _, b = splits[i]
            add = blocks[i] if i in blocks else b[:, None]
            if i == 0 and fine_is_projected:
                x = add.add_(x) if i in blocks else x + add
            else:
                x = torch.addmm(add, w_prev, x)
            x = x.relu_()

        w_prev, w_c, b = splits[-1]
        if classes is not None and w_prev.shape[0] > 1:
            # Only each region's class: (R, 1, Din) x (R, Din, P) on views of x.
            P = x.shape[1] // max(R, 1)
            xr = x.view(x.shape[0], R, P).transpose(0, 1)
            out = torch.bmm(w_prev[classes].unsqueeze(1), xr)
            if w_c is not None:
                # In-place products are not cast by autocast: give them out's dtype
                # (a no-op in float32; bfloat16 under torch.autocast).
                cr = coarse.view(coarse.shape[0], R, P).transpose(0, 1).to(out.dtype)
                out = out.baddbmm_(w_c[classes].unsqueeze(1).to(out.dtype), cr)
            out = out + b[classes][:, None, None]
            return out.reshape(1, R * P)
        out = torch.addmm(b[:, None], w_prev, x)
        if w_c is not None:
            out = out.addmm_(w_c.to(out.dtype), coarse.to(out.dtype))
        return out


def build_pointrend_point_head(cfg, in_channels: int, num_classes: int) -> nn.Module:
    """Build ``cfg.MODEL.POINTREND.POINT_HEAD.NAME`` from d2seg's point-head registry."""
    name = cfg.MODEL.POINTREND.POINT_HEAD.NAME
    if name not in POINTREND_POINT_HEAD_REGISTRY:
        raise KeyError(
            f"MODEL.POINTREND.POINT_HEAD.NAME = {name!r} is not in d2seg's point-head registry "
            f"(known: {sorted(k for k, _ in POINTREND_POINT_HEAD_REGISTRY)})"
        )
    return POINTREND_POINT_HEAD_REGISTRY.get(name)(cfg, in_channels, num_classes)
