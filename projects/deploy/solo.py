"""Export graphs of SOLO, Decoupled SOLO and SOLOv2: the whole of ``SOLOBase.inference`` and
:func:`d2seg.solo.inference.postprocess_candidates` in the graph.

Per level: point NMS on the category probabilities, the (cell, class) pairs above SCORE_THR
and their mask probabilities (resized to the finest level's mask size); then the masks
whose binary area exceeds their level's stride, maskness rescoring, the best NMS_PRE,
Matrix NMS (NMS_TYPE "matrix": the decays computed in parallel, an ONNX graph of matrix
products) or hard mask NMS (NMS_TYPE "mask": the greedy loop as an ONNX Loop), the scores
above UPDATE_THR (Matrix NMS), the best MAX_PER_IMG, and the masks upsampled to the padded
input, cropped, resized to the output size and thresholded; boxes of the masks. Dynamic
input height and width.

Shape shorthand: K candidates, C classes, S a level's grid size, hc x wc the common mask size.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from d2seg.solo.inference import point_nms
from d2seg.solo.solo import SOLO, DecoupledSOLO, SOLOBase, SOLOv2

from .graph import InstancesGraph, crop_and_resize, register_graph, topk_at_most
from .masks import mask_boxes

__all__ = ["SOLOGraph", "matrix_nms_sorted", "mask_nms_sorted"]


def _same_class_iou(binary: Tensor, labels: Tensor, areas: Tensor) -> Tensor:
    """(K, K) IoU of the binary masks, 0 between different classes: the entries
    :func:`d2seg.layers.matrix_nms.mask_iou_matrix` computes per class (sums of 0/1 products,
    exact in float32 in any order)."""
    f = binary.flatten(1).to(torch.float32)
    inter = (f @ f.t()) * (labels[:, None] == labels[None, :]).to(torch.float32)
    union = areas[:, None] + areas[None, :] - inter
    return inter / union.clamp(min=1e-6)


def matrix_nms_sorted(binary: Tensor, labels: Tensor, scores: Tensor, areas: Tensor, kernel: str,
                      sigma: float) -> Tensor:
    """:func:`d2seg.layers.matrix_nms.matrix_nms` on candidates already sorted by score (best
    first), without its Python branches: (K, hc, wc) bool, (K,), (K,), (K,) -> (K,) decayed scores.
    A row of 0 (compensation) and of 1 (decay) under the reductions keeps them defined for K = 0
    without changing them (IoU >= 0; each column's minimum is <= 1 already)."""
    iou = _same_class_iou(binary, labels, areas).triu(diagonal=1)
    compensate = torch.cat([iou.new_zeros((1, iou.shape[1])), iou]).amax(dim=0)  # (K,)
    if kernel == "gaussian":
        decay = torch.exp(-sigma * iou ** 2) / torch.exp(-sigma * compensate ** 2)[:, None]
    else:
        decay = (1.0 - iou) / (1.0 - compensate).clamp(min=1e-6)[:, None]
    decay = torch.cat([decay.new_ones((1, decay.shape[1])), decay]).amin(dim=0)
    return scores * decay


@torch.jit.script
def _greedy_keep(over: Tensor) -> Tensor:
    """Greedy NMS on a (K, K) bool "i suppresses j" matrix of candidates sorted best first:
    (K,) bool kept. Scripted, so that the export records an ONNX Loop over the candidates."""
    n = over.shape[0]
    idx = torch.arange(n)
    suppressed = torch.zeros([n], dtype=torch.bool)
    kept = torch.zeros([n], dtype=torch.bool)
    for i in range(n):
        k = torch.logical_not(suppressed[i])
        kept = kept | ((idx == i) & k)
        suppressed = suppressed | (over[i] & k)
    return kept


def mask_nms_sorted(binary: Tensor, labels: Tensor, areas: Tensor, iou_threshold: float) -> Tensor:
    """:func:`d2seg.layers.matrix_nms.mask_nms` on candidates sorted best first: (K,) indices kept."""
    over = _same_class_iou(binary, labels, areas) > iou_threshold
    return torch.nonzero(_greedy_keep(over))[:, 0]


class SOLOGraph(InstancesGraph):
    """SOLO / Decoupled SOLO / SOLOv2 inference as a graph (module doc)."""

    def __init__(self, model: SOLOBase):
        super().__init__(model, model.backbone.size_divisibility)

    def level_masks(self, mask_state, level: int, cells: Tensor) -> Tensor:
        """(R,) cells of image 0 -> (R, h, w) mask probabilities of ``level``."""
        m = self.model
        if isinstance(m, SOLOv2):  # the dynamic 1x1 kernels as one matrix product (one image)
            kernel_preds, mask_feat = mask_state
            kernels = kernel_preds[level][0].flatten(1).t()[cells]  # (R, E)
            h, w = mask_feat.shape[-2:]
            return (kernels @ mask_feat[0].flatten(1)).reshape(-1, h, w).sigmoid()
        return m.level_mask_probs(mask_state, level, torch.zeros_like(cells), cells)

    def run(self, x, image_size, output_size):
        m, p = self.model, self.model.inference_params
        features = m.backbone(x)
        hp, wp = x.shape[-2:]
        level_features = [  # SOLOBase.level_features: (ceil(Hp / s), ceil(Wp / s))
            F.interpolate(features[f], size=((hp + s - 1) // s, (wp + s - 1) // s), mode="bilinear",
                          align_corners=False)
            for f, s in zip(m.instance_in_features, m.instance_strides)]
        cate_preds, mask_state = m.predict(features, level_features)
        sizes = [m.level_mask_size(mask_state, lvl) for lvl in range(len(cate_preds))]
        common = max(sizes, key=lambda s: s[0] * s[1])
        masks, scores, classes, min_areas = [], [], [], []
        for lvl, pred in enumerate(cate_preds):
            flat = point_nms(pred.sigmoid())[0].permute(1, 2, 0).reshape(-1, m.num_classes)  # (S*S, C)
            cand = torch.nonzero(flat > p.score_thr)
            cells, cls = cand[:, 0], cand[:, 1]
            probs = self.level_masks(mask_state, lvl, cells)
            if tuple(sizes[lvl]) != tuple(common):
                probs = F.interpolate(probs[:, None], size=tuple(common), mode="bilinear",
                                      align_corners=False)[:, 0]
            masks.append(probs)
            scores.append(flat[cells, cls])
            classes.append(cls)
            min_areas.append(torch.full_like(cells, int(m.instance_strides[lvl])).to(torch.float32))
        probs, scores, classes = torch.cat(masks), torch.cat(scores), torch.cat(classes)
        min_areas = torch.cat(min_areas)

        binary = probs > p.mask_thr
        areas = binary.flatten(1).sum(dim=1).to(torch.float32)
        kept = torch.nonzero(areas > min_areas)[:, 0]
        maskness = (probs * binary).flatten(1).sum(dim=1)[kept] / areas[kept]
        scores, order = topk_at_most(scores[kept] * maskness, p.nms_pre)
        sel = kept[order]
        probs, binary, areas, classes = probs[sel], binary[sel], areas[sel], classes[sel]
        if p.nms_type == "matrix":
            scores = matrix_nms_sorted(binary, classes, scores, areas, p.nms_kernel, p.nms_sigma)
            keep = torch.nonzero(scores >= p.update_thr)[:, 0]
        else:
            keep = mask_nms_sorted(binary, classes, areas, p.nms_iou_thr)
        scores, order = topk_at_most(scores[keep], p.max_per_img)
        keep = keep[order]
        probs, classes = probs[keep], classes[keep]
        full = F.interpolate(probs[:, None], size=(hp, wp), mode="bilinear", align_corners=False)
        out_masks = crop_and_resize(full, image_size, output_size)[:, 0] > p.mask_thr
        return mask_boxes(out_masks), scores, classes, out_masks


@register_graph(SOLO, DecoupledSOLO, SOLOv2)
def _solo_graph(model):
    return SOLOGraph(model)
