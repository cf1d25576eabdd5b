"""ResNet-FPN backbone with P3-P7 where P6 is computed from P5 (the FCOS paper's choice).

Detectron2's ``build_retinanet_resnet_fpn_backbone`` computes P6 from C5 (res5); FCOS and
AdelaiDet's ``build_fcos_resnet_fpn_backbone`` compute it from P5. The module names are
Detectron2's (``bottom_up``, ``fpn_lateral3``, ``fpn_output3``, ..., ``top_block.p6``,
``top_block.p7``), which are also AdelaiDet's, so its FCOS checkpoints load; only the
input channels of ``top_block.p6`` differ between the two builders.
"""
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["P6P7", "build_fcos_resnet_fpn_backbone", "use_safe_top_blocks"]


def _conv(conv, x):
    # PyTorch 2.14's CPU bfloat16 convolution backward leaves parts of the weight gradient
    # uninitialised (NaN or garbage) for a 3x3 stride-2 conv on a 1x1 input (any batch, 16+
    # channels; reproduced without d2seg, see docs/mixed_precision.md). P6/P7 have such
    # inputs on images up to 64 (P6) or 128 px (P7's input is P6): under CPU autocast those
    # two tiny convs then run in float32.
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and min(x.shape[-2:]) == 1:
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)


class P6P7(LastLevelP6P7):
    """Detectron2's LastLevelP6P7 (same parameters and names), safe under CPU autocast."""

    def forward(self, c5):
        p6 = _conv(self.p6, c5)
        return [p6, _conv(self.p7, F.relu(p6))]


def use_safe_top_blocks(model):
    """Make every Detectron2 ``LastLevelP6P7`` in ``model`` a :class:`P6P7` (in place; the
    state dict is unchanged). Returns the number changed."""
    n = 0
    for m in model.modules():
        if type(m) is LastLevelP6P7:
            m.__class__ = P6P7
            n += 1
    return n


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet + FPN on ``MODEL.FPN.IN_FEATURES`` (res3-res5) + P6/P7 from P5."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=P6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
