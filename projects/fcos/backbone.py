"""ResNet-FPN backbone with P3-P7 where P6 is computed from P5 (the FCOS paper's choice).

Detectron2's ``build_retinanet_resnet_fpn_backbone`` computes P6 from C5 (res5); FCOS and
AdelaiDet's ``build_fcos_resnet_fpn_backbone`` compute it from P5. The module names are
Detectron2's (``bottom_up``, ``fpn_lateral3``, ``fpn_output3``, ..., ``top_block.p6``,
``top_block.p7``), which are also AdelaiDet's, so its FCOS checkpoints load; only the
input channels of ``top_block.p6`` differ between the two builders.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["build_fcos_resnet_fpn_backbone"]


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
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
