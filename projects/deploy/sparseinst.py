"""Export graph of SparseInst (with or without the PointRend refiner's absence: the plain
meta-architecture). Everything of :meth:`SparseInst.inference` is in the graph: rescored
probabilities, the class threshold, the top MAX_DETECTIONS, maskness rescoring, mask
upsampling to the padded input, cropping, resizing to the output size, the mask threshold
and the boxes of the masks.

Dynamic input height and width: the pyramid pooling's adaptive bins
(:func:`d2seg.sparseinst.encoder.adaptive_avg_pool2d_exportable`) and the decoder's
coordinate features are computed from the map size inside the graph.
"""
import torch
import torch.nn.functional as F

from d2seg.sparseinst.sparseinst import SparseInst, maskness, rescored_probabilities

from .graph import InstancesGraph, crop_and_resize, register_graph, topk_at_most
from .masks import mask_boxes

__all__ = ["SparseInstGraph"]


class SparseInstGraph(InstancesGraph):
    """SparseInst's inference as a graph (see the module doc); outputs as InstancesGraph."""

    def __init__(self, model: SparseInst):
        super().__init__(model, model.size_divisibility)

    def run(self, x, image_size, output_size):
        m = self.model
        out = m.predict(x)
        probs = rescored_probabilities(out["pred_logits"], out["pred_scores"])[0]  # (N, C)
        scores, classes = probs.max(dim=-1)
        idx = torch.nonzero(scores > m.cls_threshold)[:, 0]
        scores, top = topk_at_most(scores[idx], m.max_detections)
        idx = idx[top]
        classes = classes[idx]
        probs_m = out["pred_masks"][0, idx].sigmoid()  # (R, Hm, Wm)
        if m.mask_rescore:
            scores = scores * maskness(probs_m, m.mask_threshold)
        # (R, 1, ...): R = 0 is a valid batch for the resizes (not a valid channel count)
        full = F.interpolate(probs_m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
        masks = crop_and_resize(full, image_size, output_size)[:, 0] > m.mask_threshold
        return mask_boxes(masks), scores, classes, masks


@register_graph(SparseInst)
def _sparseinst_graph(model):
    return SparseInstGraph(model)
