"""IAM-based segmentation decoder (paper Sec. 3.4).

Shapes: B batch, C encoder channels (+2 coordinate channels), H x W the 1/8 map,
N number of instances (NUM_MASKS), G IAM groups, E branch width (DIM), D kernel dim
(KERNEL_DIM), K number of classes, Hm x Wm the output mask size (SCALE_FACTOR x H, W).

Parameter names follow hustvl/SparseInst (``inst_branch.inst_convs.<2i>``,
``inst_branch.iam_conv``, ``inst_branch.fc``, ``inst_branch.cls_score``,
``inst_branch.mask_kernel``, ``inst_branch.objectness``, ``mask_branch.mask_convs.<2i>``,
``mask_branch.projection``) so its checkpoints load unchanged.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, get_norm
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init

from .matcher import grid_cell_centres, normalised_centres

SPARSE_INST_DECODER_REGISTRY = Registry("SPARSE_INST_DECODER")
SPARSE_INST_DECODER_REGISTRY.__doc__ = "SparseInst decoders: 1/8 map -> logits, masks, objectness."


def stack_3x3_convs(num_convs: int, in_channels: int, out_channels: int, norm: str = "") -> nn.Sequential:
    """``num_convs`` x (3x3 conv [+ norm], ReLU); convs sit at even indices (0, 2, 4, ...)."""
    layers = []
    for _ in range(num_convs):
        layers.append(
            Conv2d(in_channels, out_channels, 3, padding=1, bias=not norm, norm=get_norm(norm, out_channels))
        )
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return nn.Sequential(*layers)


def coordinate_features(x: torch.Tensor) -> torch.Tensor:
    """Normalised absolute (x, y) coordinates in [-1, 1] (CoordConv). (B, *, H, W) -> (B, 2, H, W).

    Channel 0 is x (along W), channel 1 is y (along H), ends included, as in the reference.
    """
    b, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=x.dtype) * (2.0 / max(h - 1, 1)) - 1.0
    xs = torch.arange(w, device=x.device, dtype=x.dtype) * (2.0 / max(w - 1, 1)) - 1.0
    y_map = ys.view(1, 1, h, 1).expand(b, 1, h, w)
    x_map = xs.view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([x_map, y_map], dim=1)


def iam_location_prior(num_masks: int, h: int, w: int, sigma: float, device=None, dtype=None,
                       extent: Tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Log-Gaussian location prior for the activation maps (d2seg's departure, off by default).

    Instance ``i`` of ``num_masks`` is given a cell of a ceil(sqrt(N)) x ceil(sqrt(N)) grid over
    the image (row-major) and the prior ``-d^2 / (2 sigma^2)``, ``d`` the distance from the
    cell's centre in coordinates normalised to [0, 1] over the image (pixel centres). The
    image covers ``extent`` = (height, width) fractions of the H x W map (1, 1 unpadded; less
    in a batch padded to a larger image: ``matcher.image_extents``). Added to the IAM logits
    before the sigmoid, it makes instance ``i`` aggregate features near its cell first, so
    that from-scratch features, which do not yet tell objects apart, still give every
    instance different features (docs/sparseinst.md). Returns (N, H, W).
    """
    # the cells MATCHER.LOCATION_SIGMA measures from
    cells = grid_cell_centres(num_masks, device).to(dtype or torch.float32)
    cx, cy = cells[:, 0], cells[:, 1]
    ys = normalised_centres(h, float(extent[0]), device, dtype or torch.float32)
    xs = normalised_centres(w, float(extent[1]), device, dtype or torch.float32)
    d2 = (ys.view(1, h, 1) - cy.view(-1, 1, 1)) ** 2 + (xs.view(1, 1, w) - cx.view(-1, 1, 1)) ** 2
    return -d2 / (2.0 * sigma * sigma)


def aggregate_instance_features(iam_prob: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """z = A_bar X^T: features averaged under each activation map, each map normalised to 1.

    iam_prob: (B, M, H, W) in [0, 1]; features: (B, E, H, W) -> (B, M, E).
    """
    b, m = iam_prob.shape[:2]
    e = features.shape[1]
    a = iam_prob.flatten(2)  # (B, M, HW)
    z = torch.bmm(a, features.flatten(2).transpose(1, 2))  # (B, M, E)
    return z / a.sum(-1).clamp(min=1e-6).unsqueeze(-1)


def kernel_mask_product(kernels: torch.Tensor, mask_features: torch.Tensor, use_op: bool = False) -> torch.Tensor:
    """m_i = w_i . M for every instance. kernels: (B, N, D); mask_features: (B, D, H, W) -> (B, N, H, W).

    With ``use_op`` (and outside ONNX export) ``d2seg.layers.dynamic_kernel_product`` (plain
    PyTorch: per-image matmuls, not a compiled op) is used; otherwise a batched matmul.
    """
    b, n, d = kernels.shape
    h, w = mask_features.shape[-2:]
    if use_op and not torch.onnx.is_in_onnx_export():
        from d2seg.layers import dynamic_kernel_product

        im_inds = torch.arange(b, device=kernels.device).repeat_interleave(n)
        return dynamic_kernel_product(kernels.reshape(b * n, d), mask_features, im_inds).view(b, n, h, w)
    return torch.bmm(kernels, mask_features.flatten(2)).view(b, n, h, w)


class InstanceBranch(nn.Module):
    """Instance branch with one activation map per instance (vanilla IAM).

    (B, C+2, H, W) -> logits (B, N, K), kernels (B, N, D), objectness logits (B, N, 1),
    IAM logits (B, N, H, W).
    """

    groups = 1

    def __init__(self, in_channels, dim=256, num_convs=4, num_masks=100, kernel_dim=128, num_classes=80,
                 norm="", prior_prob=0.01, location_prior=0.0):
        super().__init__()
        self.num_masks = num_masks
        if location_prior < 0:
            raise ValueError(f"MODEL.SPARSE_INST.DECODER.IAM_LOCATION_PRIOR must be >= 0 (0 = off), got {location_prior}")
        self.location_prior = float(location_prior)
        self.inst_convs = stack_3x3_convs(num_convs, in_channels, dim, norm)
        self.iam_conv = self._make_iam_conv(dim, num_masks)
        feat_dim = dim * self.groups
        self._make_fc(feat_dim)
        self.cls_score = nn.Linear(feat_dim, num_classes)
        self.mask_kernel = nn.Linear(feat_dim, kernel_dim)
        self.objectness = nn.Linear(feat_dim, 1)
        self._init_weights(prior_prob)

    def _make_iam_conv(self, dim, num_masks):
        return nn.Conv2d(dim, num_masks, 3, padding=1)

    def _make_fc(self, feat_dim):
        pass

    def _init_weights(self, prior_prob):
        for m in self.inst_convs.modules():
            if isinstance(m, nn.Conv2d):
                weight_init.c2_msra_fill(m)
        bias = -math.log((1 - prior_prob) / prior_prob)
        for m in (self.iam_conv, self.cls_score):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.constant_(m.bias, bias)
        nn.init.normal_(self.mask_kernel.weight, std=0.01)
        nn.init.constant_(self.mask_kernel.bias, 0.0)

    def instance_features(self, iam_prob, features):
        return aggregate_instance_features(iam_prob, features)

    def add_location_prior(self, iam: torch.Tensor,
                           image_extents: Optional[List[Tuple[float, float]]] = None) -> torch.Tensor:
        """IAM logits (B, G*N, H, W) + the location prior of each instance (same in every group),
        relative to each image's extent on the map (``matcher.image_extents``; None: every
        image covers the whole map)."""
        if self.location_prior <= 0:
            return iam
        h, w = iam.shape[-2:]
        if image_extents is None:
            prior = iam_location_prior(self.num_masks, h, w, self.location_prior, iam.device, iam.dtype)
            return iam + prior.repeat(self.groups, 1, 1).unsqueeze(0)
        if len(image_extents) != iam.shape[0]:
            raise ValueError(f"{len(image_extents)} image extents for a batch of {iam.shape[0]}")
        prior = torch.stack([iam_location_prior(self.num_masks, h, w, self.location_prior, iam.device, iam.dtype, e)
                             for e in image_extents])
        return iam + prior.repeat(1, self.groups, 1, 1)

    def forward(self, x, image_extents: Optional[List[Tuple[float, float]]] = None):
        """x: (B, C+2, H, W); image_extents: see :meth:`add_location_prior`."""
        features = self.inst_convs(x)
        iam = self.add_location_prior(self.iam_conv(features), image_extents)
        z = self.instance_features(iam.sigmoid(), features)
        return self.cls_score(z), self.mask_kernel(z), self.objectness(z), iam


class GroupInstanceBranch(InstanceBranch):
    """Group-IAM: a G-group 3x3 conv gives G maps per instance; the G aggregated features
    of an instance are concatenated (B, N, G*E) and mixed by ``fc`` + ReLU before the heads.
    """

    def __init__(self, in_channels, groups=4, **kwargs):
        self.groups = groups
        super().__init__(in_channels, **kwargs)

    def _make_iam_conv(self, dim, num_masks):
        if dim % self.groups:
            raise ValueError(f"MODEL.SPARSE_INST.DECODER.INST.DIM={dim} is not divisible by GROUPS={self.groups}")
        return nn.Conv2d(dim, num_masks * self.groups, 3, padding=1, groups=self.groups)

    def _make_fc(self, feat_dim):
        self.fc = nn.Linear(feat_dim, feat_dim)

    def _init_weights(self, prior_prob):
        super()._init_weights(prior_prob)
        weight_init.c2_xavier_fill(self.fc)

    def instance_features(self, iam_prob, features):
        z = aggregate_instance_features(iam_prob, features)  # (B, G*N, E), group-major
        b, _, e = z.shape
        n = self.num_masks
        z = z.view(b, self.groups, n, e).transpose(1, 2).reshape(b, n, self.groups * e)
        return F.relu(self.fc(z))


class MaskBranch(nn.Module):
    """(B, C+2, H, W) -> mask features M (B, D, H, W): 3x3 convs then a 1x1 projection."""

    def __init__(self, in_channels, dim=256, num_convs=4, kernel_dim=128, norm=""):
        super().__init__()
        self.mask_convs = stack_3x3_convs(num_convs, in_channels, dim, norm)
        self.projection = nn.Conv2d(dim, kernel_dim, 1)
        for m in self.mask_convs.modules():
            if isinstance(m, nn.Conv2d):
                weight_init.c2_msra_fill(m)
        weight_init.c2_msra_fill(self.projection)

    def forward(self, x):
        return self.projection(self.mask_convs(x))


@SPARSE_INST_DECODER_REGISTRY.register()
class BaseIAMDecoder(nn.Module):
    """Coordinates + encoder features -> instance branch and mask branch -> masks = kernels . M.

    forward returns ``pred_logits`` (B, N, K), ``pred_masks`` (B, N, Hm, Wm) logits at
    SCALE_FACTOR x the 1/8 size, ``pred_scores`` (B, N, 1) objectness logits and, with
    OUTPUT_IAM, ``pred_iam`` (B, G*N, Hm, Wm).
    """

    branch_class = InstanceBranch

    def __init__(self, in_channels, num_masks=100, num_classes=80, kernel_dim=128, inst_dim=256, inst_convs=4,
                 mask_dim=256, mask_convs=4, scale_factor=2.0, groups=4, norm="", output_iam=False,
                 kernel_product="torch", location_prior=0.0):
        super().__init__()
        c = in_channels + 2
        kw = dict(dim=inst_dim, num_convs=inst_convs, num_masks=num_masks, kernel_dim=kernel_dim,
                  num_classes=num_classes, norm=norm, location_prior=location_prior)
        if self.branch_class is GroupInstanceBranch:
            kw["groups"] = groups
        self.inst_branch = self.branch_class(c, **kw)
        self.mask_branch = MaskBranch(c, mask_dim, mask_convs, kernel_dim, norm)
        self.scale_factor = float(scale_factor)
        self.output_iam = output_iam
        if kernel_product not in ("torch", "auto"):
            raise ValueError(f"MODEL.SPARSE_INST.DECODER.KERNEL_PRODUCT must be 'torch' or 'auto', got {kernel_product!r}")
        self.use_kernel_op = False
        if kernel_product == "auto":
            try:
                from d2seg.layers import dynamic_kernel_product  # noqa: F401

                self.use_kernel_op = True
            except ImportError:
                self.use_kernel_op = False

    @classmethod
    def from_config(cls, cfg, in_channels):
        d = cfg.MODEL.SPARSE_INST.DECODER
        return cls(in_channels, num_masks=d.NUM_MASKS, num_classes=d.NUM_CLASSES, kernel_dim=d.KERNEL_DIM,
                   inst_dim=d.INST.DIM, inst_convs=d.INST.CONVS, mask_dim=d.MASK.DIM, mask_convs=d.MASK.CONVS,
                   scale_factor=d.SCALE_FACTOR, groups=d.GROUPS, norm=d.NORM, output_iam=d.OUTPUT_IAM,
                   kernel_product=d.KERNEL_PRODUCT, location_prior=d.IAM_LOCATION_PRIOR)

    def forward(self, features: torch.Tensor,
                image_extents: Optional[List[Tuple[float, float]]] = None) -> Dict[str, torch.Tensor]:
        """features: (B, C, H, W); image_extents: the (height, width) fractions of the padded
        batch each image covers (``matcher.image_extents``), for the location prior; None:
        every image fills the batch."""
        x = torch.cat([coordinate_features(features), features], dim=1)
        logits, kernels, objectness, iam = self.inst_branch(x, image_extents)
        mask_features = self.mask_branch(x)
        masks = kernel_mask_product(kernels, mask_features, self.use_kernel_op)
        if self.scale_factor != 1.0:
            masks = F.interpolate(masks, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        out = {"pred_logits": logits, "pred_masks": masks, "pred_scores": objectness}
        if self.output_iam:
            out["pred_iam"] = F.interpolate(iam, scale_factor=self.scale_factor, mode="bilinear",
                                            align_corners=False)
        return out


@SPARSE_INST_DECODER_REGISTRY.register()
class GroupIAMDecoder(BaseIAMDecoder):
    """BaseIAMDecoder with Group-IAM (GROUPS maps per instance)."""

    branch_class = GroupInstanceBranch


def build_sparse_inst_decoder(cfg, in_channels: int) -> nn.Module:
    name = cfg.MODEL.SPARSE_INST.DECODER.NAME
    if name not in SPARSE_INST_DECODER_REGISTRY:
        raise KeyError(f"MODEL.SPARSE_INST.DECODER.NAME={name!r} is not a registered SparseInst decoder "
                       "(BaseIAMDecoder or GroupIAMDecoder)")
    return SPARSE_INST_DECODER_REGISTRY.get(name).from_config(cfg, in_channels)
