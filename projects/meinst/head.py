"""MEInst's mask branch on FCOS: a tower parallel to FCOS's cls/box towers that predicts N
mask coefficients per location, its loss on FCOS's positives, and the decoding of the
coefficients of the final detections.

Shape shorthand in this module:
    I: images, L: levels, Hl, Wl: size of level l, M = sum_l Hl*Wl locations per image,
    C: FPN channels, N: code length (DIM_MASK), m: mask side (MASK_SIZE), D = m*m,
    P: positive locations, G: ground-truth instances of an image, R: detections
"""
from typing import Dict, List

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList, Instances

from d2seg.fcos import ONE_STAGE_MASK_HEAD_REGISTRY, OneStageMaskHead, flatten_levels
from d2seg.fcos.deform_conv import ModulatedDeformConv2d
from d2seg.fcos.head import _make_tower

from .encoding import SIGMOID_EPS, MaskEncoding
from .learn import encoding_for_config
from .losses import MASK_LOSS_TYPES, code_loss, mask_bce_loss

__all__ = ["LargeKernelConv", "MEInstMaskHead", "mask_targets_of_positives"]


class LargeKernelConv(nn.Module):
    """Large-kernel prediction layer (Peng et al., "Large Kernel Matters"):
    (k x 1 then 1 x k) + (1 x k then k x 1), 'same' padding. (I, Cin, H, W) -> (I, Cout, H, W).

    Attribute names follow AdelaiDet's GCN (conv_l1, conv_l2, conv_r1, conv_r2).
    """

    def __init__(self, in_channels: int, out_channels: int, k: int = 9):
        super().__init__()
        if k % 2 != 1:
            raise ValueError(f"MODEL.MEINST.GCN_KERNEL_SIZE must be odd, got {k}.")
        p = k // 2
        self.conv_l1 = nn.Conv2d(in_channels, out_channels, (k, 1), padding=(p, 0))
        self.conv_l2 = nn.Conv2d(out_channels, out_channels, (1, k), padding=(0, p))
        self.conv_r1 = nn.Conv2d(in_channels, out_channels, (1, k), padding=(0, p))
        self.conv_r2 = nn.Conv2d(out_channels, out_channels, (k, 1), padding=(p, 0))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_l2(self.conv_l1(x)) + self.conv_r2(self.conv_r1(x))


def mask_targets_of_positives(gt_instances: List[Instances], im_inds: Tensor, gt_inds: Tensor,
                              mask_size: int) -> Tensor:
    """Binary m x m targets of the positives: each positive's GT mask cropped to its GT
    box and resized (every GT is cropped once).

    Args:
        gt_instances: I Instances with gt_boxes and gt_masks (BitMasks or PolygonMasks).
        im_inds, gt_inds: (P,) image of each positive and its GT index in that image.
    Returns:
        (P, m, m) float in {0, 1}.
    """
    per_image, offsets, start = [], [], 0
    for i, inst in enumerate(gt_instances):
        offsets.append(start)
        if len(inst) == 0:
            continue
        if not inst.has("gt_masks"):
            raise ValueError(
                "MEInst needs instance masks ('gt_masks') in training: set MODEL.MASK_ON: True "
                "so that the dataset mapper loads them."
            )
        boxes = inst.gt_boxes.tensor
        per_image.append(inst.gt_masks.crop_and_resize(boxes, mask_size).to(boxes.device).float())
        start += len(inst)
    if not per_image:
        return torch.zeros(len(im_inds), mask_size, mask_size, device=im_inds.device)
    all_masks = torch.cat(per_image)
    offsets_t = torch.tensor(offsets, device=im_inds.device, dtype=torch.long)
    return all_masks[offsets_t[im_inds] + gt_inds]


@ONE_STAGE_MASK_HEAD_REGISTRY.register()
class MEInstMaskHead(OneStageMaskHead):
    """The mask regression branch of MEInst (paper Fig. 2 (d)).

    Parameters: ``mask_tower`` (NUM_MASK_CONVS x conv3x3 + GN + ReLU, optionally DCNv2
    last), ``mask_pred`` (conv3x3 or :class:`LargeKernelConv` to N channels), and the
    frozen ``encoding`` (buffers ``components``, ``explained_variances``, ``means``).
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        in_channels: int,
        encoding: MaskEncoding,
        num_convs: int = 4,
        norm: str = "GN",
        use_deformable: bool = False,
        use_large_kernel: bool = False,
        large_kernel_size: int = 9,
        loss_type: str = "mse",
        loss_weight: float = 1.0,
        loss_on_mask: bool = False,
        target_clamp_random_max: float = 0.0,
    ):
        """
        Args:
            in_features: FPN levels, in FCOS's order (MODEL.FCOS.IN_FEATURES).
            in_channels: C.
            encoding: the frozen mask encoding (defines m and N).
            num_convs, norm, use_deformable: mask tower depth, "GN"/"none", DCNv2 last.
            use_large_kernel, large_kernel_size: large-kernel prediction layer.
            loss_type: code loss, one of MASK_LOSS_TYPES.
            loss_weight: lambda_mask.
            loss_on_mask: implicit encoding (BCE on the decoded m x m mask).
            target_clamp_random_max: 0 clamps the binary targets to [0.01, 0.99] before the
                logit; > 0 clamps each pixel to [v, 1 - v], v = max(U(0, this), 0.01) drawn
                at every step (AdelaiDet: 0.05). See :meth:`target_clamp_eps`.
        """
        super().__init__()
        norm = "" if norm in (None, "none", "") else norm
        if norm not in ("", "GN"):
            raise ValueError(f"MODEL.FCOS.NORM must be 'GN' or 'none' for MEInst, got {norm!r}.")
        if loss_type not in MASK_LOSS_TYPES:
            raise ValueError(f"MODEL.MEINST.MASK_LOSS_TYPE must be one of {MASK_LOSS_TYPES}, got {loss_type!r}.")
        if target_clamp_random_max < 0:
            raise ValueError(f"MODEL.MEINST.TARGET_CLAMP_RANDOM_MAX must be >= 0, got {target_clamp_random_max}.")
        if loss_on_mask and not encoding.sigmoid:
            raise ValueError("MODEL.MEINST.LOSS_ON_MASK needs MODEL.MEINST.SIGMOID: True (logit-space codes).")
        self.in_features = list(in_features)
        self.encoding = encoding
        self.loss_type = loss_type
        self.loss_weight = float(loss_weight)
        self.loss_on_mask = bool(loss_on_mask)
        self.target_clamp_random_max = float(target_clamp_random_max)
        n = encoding.num_components
        self.mask_tower = _make_tower(num_convs, in_channels, norm, use_deformable)
        if use_large_kernel:
            self.mask_pred = LargeKernelConv(in_channels, n, large_kernel_size)
        else:
            self.mask_pred = nn.Conv2d(in_channels, n, 3, padding=1)
        for mod in [self.mask_tower, self.mask_pred]:
            for m in mod.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
                    nn.init.constant_(m.bias, 0.0)
        for m in self.mask_tower.modules():
            if isinstance(m, ModulatedDeformConv2d):  # starts as a regular conv
                nn.init.zeros_(m.offset.weight)
                nn.init.zeros_(m.offset.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        mc = cfg.MODEL.MEINST
        if not mc.AGNOSTIC:
            raise NotImplementedError("MODEL.MEINST.AGNOSTIC: False (class-specific encodings) is not implemented.")
        in_features = list(cfg.MODEL.FCOS.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise KeyError(f"MEInst: MODEL.FCOS.IN_FEATURES {missing} not produced by the backbone "
                           f"(has {sorted(input_shape)}).")
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MEInst: all of {in_features} must have the same channels, got {channels}.")
        params = encoding_for_config(cfg)
        return {
            "in_features": in_features,
            "in_channels": channels.pop(),
            "encoding": MaskEncoding.from_params(params),
            "num_convs": mc.NUM_MASK_CONVS,
            "norm": cfg.MODEL.FCOS.NORM,
            "use_deformable": mc.USE_DEFORMABLE,
            "use_large_kernel": mc.USE_GCN_IN_MASK,
            "large_kernel_size": mc.GCN_KERNEL_SIZE,
            "loss_type": mc.MASK_LOSS_TYPE,
            "loss_weight": mc.MASK_LOSS_WEIGHT,
            "loss_on_mask": mc.LOSS_ON_MASK,
            "target_clamp_random_max": mc.TARGET_CLAMP_RANDOM_MAX,
        }

    @property
    def mask_size(self) -> int:
        return self.encoding.mask_size

    def predict_codes(self, features: Dict[str, Tensor]) -> Tensor:
        """Codes at every location: (I, M, N), locations in FCOS's order."""
        maps = [self.mask_pred(self.mask_tower(features[f])) for f in self.in_features]
        return flatten_levels(maps)

    def target_clamp_eps(self, targets: Tensor):
        """The clamp of the (P, m, m) binary targets before the logit: SIGMOID_EPS, or with
        ``target_clamp_random_max`` > 0 a (P, m * m) tensor max(U(0, max), SIGMOID_EPS)
        drawn now (AdelaiDet's PCAMaskEncoding.inverse_sigmoid: a noise on the targets)."""
        if self.target_clamp_random_max <= 0:
            return SIGMOID_EPS
        u = torch.rand_like(targets.flatten(1))
        return (u * self.target_clamp_random_max).clamp(min=SIGMOID_EPS)

    def losses(self, images: ImageList, features: Dict[str, Tensor], fcos_outputs,
               gt_instances: List[Instances]) -> Dict[str, Tensor]:
        """{"loss_mask": lambda_mask * L_mask} on FCOS's positives."""
        codes = self.predict_codes(features)
        pos = fcos_outputs.positives
        pred = codes[pos.im_inds, pos.loc_inds]  # (P, N)
        weights = pos.ctrness_targets.to(pred.dtype)
        with torch.no_grad():
            targets = mask_targets_of_positives(gt_instances, pos.im_inds, pos.gt_inds, self.mask_size)
        if self.loss_on_mask:
            logits = self.encoding.decode(pred, activate=False).flatten(1)
            loss = mask_bce_loss(logits, targets.flatten(1), weights)
        else:
            codes = self.encoding.encode(targets, self.target_clamp_eps(targets))
            loss = code_loss(pred, codes, weights, self.loss_type)
        return {"loss_mask": self.loss_weight * loss}

    def inference(self, images: ImageList, features: Dict[str, Tensor], fcos_outputs,
                  detections: List[Instances]) -> List[Instances]:
        """Adds ``pred_masks`` (R, 1, m, m) box-relative probabilities to each image's
        detections; all detections of the batch are decoded in one matrix product."""
        codes = self.predict_codes(features)
        picked = [codes[i, det.loc_inds] for i, det in enumerate(detections)]
        masks = self.encoding.decode(torch.cat(picked)) if picked else codes.new_zeros(0, self.mask_size, self.mask_size)
        for det, m in zip(detections, masks.split([len(d) for d in detections])):
            det.pred_masks = m[:, None]
        return detections
