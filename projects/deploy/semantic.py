"""Export graph of the semantic models (``D2SegSemanticSegmentor``: Semantic FPN and PointRend
semantic, and Detectron2's ``SemanticSegmentor``): backbone, the semantic head's inference
(PointRend's subdivision steps included) and ``sem_seg_postprocess`` (the unpadded part,
resized bilinearly to the output size). Output sem_seg (K, Ho, Wo) float32, the values the
PyTorch model returns.
"""
from detectron2.modeling import SemanticSegmentor

from d2seg.pointrend.semantic_seg import D2SegSemanticSegmentor

from .graph import SemSegGraph, crop_and_resize, register_graph

__all__ = ["SemanticGraph"]


class SemanticGraph(SemSegGraph):
    """A semantic model's inference as a graph (module doc)."""

    def __init__(self, model):
        super().__init__(model, model.backbone.size_divisibility)

    def run(self, x, image_size, output_size):
        logits, _ = self.model.sem_seg_head(self.model.backbone(x), None)
        return crop_and_resize(logits, image_size, output_size)[0]


@register_graph(D2SegSemanticSegmentor, SemanticSegmentor)
def _semantic_graph(model):
    return SemanticGraph(model)
