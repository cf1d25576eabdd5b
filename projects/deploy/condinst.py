"""Export graph of CondInst (``OneStageDetector`` with ``CondInstMaskHead``): FCOS's detections
(as in :mod:`d2seg.deploy.fcos`) with the controller's dynamic parameters at each detection,
the mask branch, the dynamic mask head with relative coordinates, the upsampling to
MASK_OUT_STRIDE and to the input (MODEL.CONDINST.UPSAMPLING's convention), and
``CondInstMaskHead.postprocess``: boxes rescaled, clipped and the empty ones dropped, mask
probabilities resized to the output size and thresholded. Dynamic input height and width.

The dynamic mask head runs as batched matrix products over the R detections
(R x (out, in) @ (in, H*W) per layer) where the PyTorch reference uses a convolution grouped
R ways: ONNX convolutions need their group count when the graph is built.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from d2seg.condinst.condinst import CondInstMaskHead
from d2seg.condinst.mask_branch import upsample
from d2seg.layers.dynamic_conv import parse_dynamic_params, relative_coordinates

from .fcos import MASK_HEAD_GRAPHS, fcos_detections
from .graph import InstancesGraph, crop_and_resize, rescale_boxes

__all__ = ["CondInstGraph", "dynamic_mask_head_graph"]


def dynamic_mask_head_graph(mask_feats: Tensor, params: Tensor, channels: int, num_layers: int,
                            locations, stride: int, scales) -> Tensor:
    """:func:`d2seg.layers.dynamic_conv.dynamic_mask_head` for one image as batched matmuls.
    mask_feats (1, C, H, W); params (R, P); locations (R, 2) or None; scales (R,) or None
    -> (R, 1, H, W) mask logits."""
    _, c, h, w = mask_feats.shape
    r = params.shape[0]
    x = mask_feats.reshape(1, c, h * w).expand(r, c, h * w)
    if locations is not None:
        rel = relative_coordinates(locations, h, w, stride, scales).reshape(r, 2, h * w)
        x = torch.cat([rel.to(x.dtype), x], dim=1)
    weights, biases = parse_dynamic_params(params, x.shape[1], channels, num_layers)
    for layer, (wt, b) in enumerate(zip(weights, biases)):
        x = torch.bmm(wt, x) + b[:, :, None]
        if layer < num_layers - 1:
            x = F.relu(x)
    return x.reshape(r, 1, h, w)


class CondInstGraph(InstancesGraph):
    """CondInst's inference as a graph (module doc)."""

    def __init__(self, model):
        super().__init__(model, model.backbone.size_divisibility)

    def run(self, x, image_size, output_size):
        model, head = self.model, self.model.mask_head
        features = model.backbone(x)
        det = fcos_detections(model.proposal_generator, features, image_size, top_module=head.controller)
        mask_feats, _ = head.mask_branch(features)
        if head.rel_coords:
            locations = det["locations"]
            scales = head.sizes_of_interest.to(det["top_feats"].dtype)[det["fpn_levels"]]
        else:
            locations = scales = None
        logits = dynamic_mask_head_graph(mask_feats, det["top_feats"], head.channels, head.num_layers,
                                         locations, head.mask_feat_stride, scales)
        logits = upsample(logits, head.mask_feat_stride // head.mask_out_stride, head.upsampling)
        probs = upsample(logits.sigmoid(), head.mask_out_stride, head.upsampling)  # (R, 1, >= Hp, >= Wp)
        boxes, keep = rescale_boxes(det["boxes"], image_size, output_size)
        masks = crop_and_resize(probs[keep], image_size, output_size)[:, 0] > head.mask_threshold
        return boxes[keep], det["scores"][keep], det["classes"][keep], masks


MASK_HEAD_GRAPHS[CondInstMaskHead] = CondInstGraph
