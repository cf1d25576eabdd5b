"""CondInst's mask branch: FPN features fused at P3's stride -> a few mask-feature
channels shared by all instances of an image, and the optional auxiliary semantic loss.

Shape shorthand:
    N: images, C: FPN channels, Hs, Ws: size of the first input feature (stride s, 8 for P3),
    F: mask-feature channels (MASK_BRANCH.OUT_CHANNELS, 8), K: classes, G: instances.

Parameter names follow AdelaiDet's ``MaskBranch`` (``refine.{i}``, ``tower.{i}``,
``seg_head``, ``logits``) so its checkpoints map by prefix (docs/condinst_blendmask.md).
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from detectron2.layers import ShapeSpec, get_norm
from detectron2.structures import Instances

__all__ = ["aligned_upsample", "conv_norm_relu", "MaskBranch", "semantic_targets", "top_left_upsample", "upsample"]


def aligned_upsample(x: Tensor, factor: int) -> Tensor:
    """Upsample (N, C, H, W) to (N, C, factor*H, factor*W) keeping pixel centres aligned:
    with input pixel j centred at j*s + s/2 in the image (s its stride; FCOS and CondInst
    locations are j*s + s//2), output pixel i (centre i*s/f + s/(2f)) samples the input at
    (i + 0.5) / factor - 0.5, bilinearly, clamped at the borders. This is
    ``F.interpolate(..., align_corners=False)``. (AdelaiDet's ``aligned_bilinear`` samples at
    (i - factor//2) / factor instead, a quarter of an input pixel apart for factor 2.)"""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"aligned_upsample: factor must be a positive integer, got {factor}")
    factor = int(factor)
    if factor == 1:
        return x
    N, C, H, W = x.shape
    if N * C * H * W == 0 and not torch.jit.is_tracing():  # an ONNX graph keeps the general path
        return x.new_zeros((N, C, H * factor, W * factor))
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def top_left_upsample(x: Tensor, factor: int) -> Tensor:
    """AdelaiDet's ``aligned_bilinear`` convention: (N, C, H, W) -> (N, C, factor*H,
    factor*W) where output pixel i reads the input bilinearly at max(i - factor//2, 0) / factor
    (input index units), the last row/column repeated beyond the border. Compared with
    :func:`aligned_upsample` the result sits up to half an input pixel towards the top-left;
    AdelaiDet's CondInst checkpoints were trained with it (``MODEL.CONDINST.UPSAMPLING``)."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"top_left_upsample: factor must be a positive integer, got {factor}")
    factor = int(factor)
    if factor == 1:
        return x
    N, C, H, W = x.shape
    if N * C * H * W == 0 and not torch.jit.is_tracing():  # an ONNX graph keeps the general path
        return x.new_zeros((N, C, H * factor, W * factor))
    # Sampling positions i / factor on a grid one pixel larger (the repeated border): an
    # align_corners=True resize to factor*H + 1 rows hits exactly those positions.
    y = F.interpolate(F.pad(x, (0, 1, 0, 1), mode="replicate"), size=(factor * H + 1, factor * W + 1),
                      mode="bilinear", align_corners=True)
    s = factor // 2
    y = F.pad(y, (s, 0, s, 0), mode="replicate")
    return y[:, :, : factor * H, : factor * W]


UPSAMPLING = {"centers": aligned_upsample, "adelaidet": top_left_upsample}


def upsample(x: Tensor, factor: int, mode: str = "centers") -> Tensor:
    """Upsample by an integer ``factor`` with the convention ``mode`` of
    ``MODEL.CONDINST.UPSAMPLING``: "centers" (:func:`aligned_upsample`) or "adelaidet"
    (:func:`top_left_upsample`)."""
    if mode not in UPSAMPLING:
        raise ValueError(f"MODEL.CONDINST.UPSAMPLING must be one of {sorted(UPSAMPLING)}, got {mode!r}")
    return UPSAMPLING[mode](x, factor)


def conv_norm_relu(in_channels: int, out_channels: int, norm: str, kernel_size: int = 3) -> nn.Sequential:
    """conv (bias only without norm) [+ norm] + ReLU; kaiming-uniform (a=1) weights."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)
    layers = [conv]
    if norm:
        layers.append(get_norm(norm, out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def semantic_targets(bitmasks: List[Tensor], classes: List[Tensor], stride: int) -> Tensor:
    """(N, Hs, Ws) class + 1 of the smallest instance covering each pixel (0: background),
    sampled at the pixel centres of a stride-``stride`` map.

    Args:
        bitmasks: N tensors (G, H, W) at the padded input size (H, W divisible by stride).
        classes: N tensors (G,).
    """
    out = []
    start = stride // 2
    for masks, cls in zip(bitmasks, classes):
        m = masks[:, start::stride, start::stride].bool()
        G, h, w = m.shape
        if G == 0:
            out.append(torch.zeros((h, w), dtype=torch.long, device=masks.device))
            continue
        area = masks.flatten(1).sum(1).float()  # (G,)
        cost = torch.where(m, area[:, None, None], torch.full_like(area[:, None, None], float("inf")))
        min_cost, idx = cost.min(dim=0)  # (h, w)
        t = cls[idx] + 1
        t[torch.isinf(min_cost)] = 0
        out.append(t)
    return torch.stack(out)


class MaskBranch(nn.Module):
    """Fuse ``in_features`` (each refined by a 3x3 conv, upsampled to the first one's size
    with the ``upsampling`` convention, summed), run a tower of 3x3 convs and a 1x1 conv to
    ``out_channels``.

    Inputs: features {name: (N, C, Hl, Wl)}. Output: (N, F, Hs, Ws) mask features and a
    dict with ``loss_sem`` when the semantic loss is on and targets are given.
    """

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: List[str],
        channels: int = 128,
        out_channels: int = 8,
        num_convs: int = 4,
        norm: str = "BN",
        semantic_loss_on: bool = False,
        num_classes: int = 80,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        upsampling: str = "centers",
    ):
        super().__init__()
        if upsampling not in UPSAMPLING:
            raise ValueError(f"MODEL.CONDINST.UPSAMPLING must be one of {sorted(UPSAMPLING)}, got {upsampling!r}")
        self.upsampling = upsampling
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.CONDINST.MASK_BRANCH.IN_FEATURES {missing} are not backbone outputs "
                f"({sorted(input_shape)})."
            )
        self.in_features = list(in_features)
        self.out_stride = input_shape[in_features[0]].stride
        self.out_channels = out_channels
        self.refine = nn.ModuleList(conv_norm_relu(input_shape[f].channels, channels, norm) for f in in_features)
        tower = [conv_norm_relu(channels, channels, norm) for _ in range(num_convs)]
        tower.append(nn.Conv2d(channels, max(out_channels, 1), 1))
        self.tower = nn.Sequential(*tower)
        self.semantic_loss_on = semantic_loss_on
        if semantic_loss_on:
            c = input_shape[in_features[0]].channels
            self.seg_head = nn.Sequential(conv_norm_relu(c, channels, norm), conv_norm_relu(channels, channels, norm))
            self.logits = nn.Conv2d(channels, num_classes, 1)
            nn.init.constant_(self.logits.bias, -math.log((1 - prior_prob) / prior_prob))
            self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def forward(
        self, features: Dict[str, Tensor], sem_targets: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """
        Args:
            features: backbone outputs, {name: (N, C, Hl, Wl)}.
            sem_targets: optional (N, Hs, Ws) long, class + 1 per pixel (0: background)
                for the semantic loss (see :func:`semantic_targets`).
        """
        x = None
        for f, refine in zip(self.in_features, self.refine):
            y = refine(features[f])
            if x is None:
                x = y
                continue
            fh, fw = x.shape[-2] // y.shape[-2], x.shape[-1] // y.shape[-1]
            if fh != fw or fh * y.shape[-2] != x.shape[-2] or fw * y.shape[-1] != x.shape[-1]:
                raise ValueError(
                    f"MaskBranch: feature {f} {tuple(y.shape[-2:])} is not an integer downscale of "
                    f"{self.in_features[0]} {tuple(x.shape[-2:])}; pad the input to a multiple of the "
                    "largest stride (backbone size_divisibility)."
                )
            x = x + upsample(y, fh, self.upsampling)
        mask_feats = self.tower(x)
        if self.out_channels == 0:
            mask_feats = mask_feats[:, :0]
        losses = {}
        if self.training and self.semantic_loss_on and sem_targets is not None:
            logits = self.logits(self.seg_head(features[self.in_features[0]]))  # (N, K, Hs, Ws)
            K = logits.shape[1]
            classes = torch.arange(1, K + 1, device=logits.device)[None, :, None, None]
            one_hot = (sem_targets[:, None] == classes).to(logits.dtype)
            num_pos = one_hot.sum().clamp(min=1.0)
            losses["loss_sem"] = (
                sigmoid_focal_loss(logits, one_hot, self.focal_alpha, self.focal_gamma, reduction="sum") / num_pos
            )
        return mask_feats, losses
