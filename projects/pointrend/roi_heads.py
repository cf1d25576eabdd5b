"""ROI heads for PointRend: Detectron2's StandardROIHeads with the mask head fed the whole
feature maps (PointRend pools its own P2 features) and an optional cascade-style training
(paper, section 4: "training as a cascade ... sampling points inside more accurate boxes").

With POINTREND.CASCADE_TRAINING the mask head is trained on the box head's regressed boxes
(for each positive proposal, its ground-truth class's box, without gradient; clipped to the
image when POINTREND.CLIP_TRAIN_BOXES, the key's default -- Detectron2 does not clip) instead of on the proposals, as at inference where it sees the detections.
"""
import logging

from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads import build_mask_head

__all__ = ["D2SegPointRendROIHeads"]

logger = logging.getLogger(__name__)


@ROI_HEADS_REGISTRY.register()
class D2SegPointRendROIHeads(StandardROIHeads):
    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["train_on_pred_boxes"] = bool(
            cfg.MODEL.POINTREND.CASCADE_TRAINING or cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES
        )
        return ret

    @configurable
    def __init__(self, *, clip_train_boxes: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.clip_train_boxes = clip_train_boxes

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["clip_train_boxes"] = bool(cfg.MODEL.POINTREND.CLIP_TRAIN_BOXES)
        return ret

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        if not cfg.MODEL.MASK_ON:
            return {}
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        return {
            "mask_in_features": in_features,
            "mask_pooler": None,  # the PointRend head samples its own features
            "mask_head": build_mask_head(cfg, {f: input_shape[f] for f in in_features}),
        }

    def _forward_box(self, features, proposals):
        out = super()._forward_box(features, proposals)
        if self.training and self.train_on_pred_boxes and self.clip_train_boxes:
            # Regressed boxes may leave the image or collapse; keep them inside.
            for p in proposals:
                p.proposal_boxes.clip(p.image_size)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Detectron2's first PointRend checkpoints named the heads mask_coarse_head /
        # mask_point_head (directly under roi_heads); map them to mask_head.*.
        from .compat import convert_upstream_state_dict

        converted = convert_upstream_state_dict({k: v for k, v in state_dict.items() if k.startswith(prefix)},
                                                prefix=prefix)
        for k in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[k]
        state_dict.update(converted)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
