"""The parts every exported graph shares: the input side (normalisation and padding to the
size divisibility inside the graph), traceable replacements of the few Python-side steps of
the methods' inference (a top-k of at most k, box clipping to a size held in a tensor,
Detectron2's ``detector_postprocess``), and the registry that maps a meta-architecture to
its export graph.

Every graph is an ``nn.Module`` whose ``forward(images, output_size)`` takes
    images       (1, 3, H, W) float32, the resized image in INPUT.FORMAT, 0-255;
    output_size  (2,) int64, (height, width) of the original image,
and returns the final results at ``output_size`` (see :class:`ExportGraph`).

Shape shorthand: R detections, K classes, H x W the input, Hp x Wp the padded input,
Ho x Wo the output size.
"""
from typing import Callable, Dict, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ExportGraph", "InstancesGraph", "SemSegGraph", "register_graph", "graph_for", "topk_at_most",
           "clip_boxes", "rescale_boxes", "crop_and_resize", "GRAPHS"]

# meta-architecture class -> function(model) -> ExportGraph
GRAPHS: Dict[Type[nn.Module], Callable[[nn.Module], "ExportGraph"]] = {}


def register_graph(*classes):
    """Decorator: ``fn(model) -> ExportGraph`` builds the export graph of a model whose type is
    one of ``classes`` (exactly: a subclass registers its own)."""
    def deco(fn):
        for cls in classes:
            GRAPHS[cls] = fn
        return fn
    return deco


def graph_for(model: nn.Module) -> "ExportGraph":
    """The export graph of ``model``; ValueError naming the model's class if it has none."""
    fn = GRAPHS.get(type(model))
    if fn is None:
        known = sorted(c.__name__ for c in GRAPHS)
        raise ValueError(f"d2seg.deploy cannot export a {type(model).__name__} (MODEL.META_ARCHITECTURE): "
                         f"the exportable meta-architectures are {known}")
    return fn(model)


def topk_at_most(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """``scores.topk(min(k, len(scores)))`` with the minimum taken inside the graph, so that the
    ONNX TopK receives a k computed from the runtime length (a Python ``min`` would freeze the
    length seen while tracing). (n,) -> values, indices (min(k, n),), best first."""
    n = torch._shape_as_tensor(scores)[:1]
    kk = torch.clamp(n, max=int(k))
    if torch.jit.is_tracing():
        return torch.topk(scores, kk)  # the tracer records k as a tensor (ONNX TopK input)
    return torch.topk(scores, int(kk))


def clip_boxes(boxes: Tensor, size: Tensor) -> Tensor:
    """Detectron2's ``Boxes.clip`` with the (h, w) limit given as a tensor. boxes (R, 4) XYXY,
    size (2,) -> (R, 4)."""
    h, w = size[0].to(boxes.dtype), size[1].to(boxes.dtype)
    x1 = torch.minimum(boxes[:, 0].clamp(min=0), w)
    y1 = torch.minimum(boxes[:, 1].clamp(min=0), h)
    x2 = torch.minimum(boxes[:, 2].clamp(min=0), w)
    y2 = torch.minimum(boxes[:, 3].clamp(min=0), h)
    return torch.stack([x1, y1, x2, y2], dim=1)


def rescale_boxes(boxes: Tensor, input_size: Tensor, output_size: Tensor) -> Tuple[Tensor, Tensor]:
    """The box part of Detectron2's ``detector_postprocess``: scale from the input to the
    output size, clip to the output size, and the rows whose box is not empty.
    boxes (R, 4); input_size, output_size (2,) (h, w) -> boxes (R, 4), keep (R,) bool."""
    scale = (output_size.to(torch.float32) / input_size.to(torch.float32)).flip(0).repeat(2)  # (sx, sy, sx, sy)
    boxes = clip_boxes(boxes * scale, output_size)
    keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    return boxes, keep


class ExportGraph(nn.Module):
    """Base of every export graph. Subclasses set ``kind`` ("instances" or "sem_seg"),
    ``output_names`` and implement :meth:`run` on the normalised, padded image.

    Args:
        model: the d2seg model (its ``pixel_mean`` / ``pixel_std`` buffers are used).
        size_divisibility: the padded input is a multiple of this (the model's own padding).
    """

    kind = ""
    output_names: Tuple[str, ...] = ()
    # False where the graph is only right at the size it was traced at (see docs/deploy.md)
    dynamic_size = True

    def __init__(self, model: nn.Module, size_divisibility: int):
        super().__init__()
        self.model = model
        self.size_divisibility = max(int(size_divisibility or 0), 1)
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone().view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone().view(1, -1, 1, 1), False)

    def forward(self, images: Tensor, output_size: Tensor):
        """images (1, 3, H, W) float32 0-255 in INPUT.FORMAT; output_size (2,) int64."""
        image_size = torch._shape_as_tensor(images)[2:]  # (h, w) as a tensor: dynamic in the graph
        x = (images - self.pixel_mean) / self.pixel_std
        d = self.size_divisibility
        if d > 1:  # ImageList.from_tensors: zero padding at the bottom and right
            h, w = x.shape[-2:]
            x = F.pad(x, (0, (d - w % d) % d, 0, (d - h % d) % d))
        return self.run(x, image_size, output_size)

    def run(self, x: Tensor, image_size: Tensor, output_size: Tensor):
        """x (1, 3, Hp, Wp) normalised and padded; image_size (2,) the unpadded (h, w)."""
        raise NotImplementedError


class InstancesGraph(ExportGraph):
    """Graph of an instance (or box) model. Outputs, best score first:
    boxes (R, 4) float32 XYXY at the output size, scores (R,) float32, classes (R,) int64 and,
    with ``has_masks``, masks (R, Ho, Wo) bool."""

    kind = "instances"
    has_masks = True

    @property
    def output_names(self):
        return ("boxes", "scores", "classes", "masks") if self.has_masks else ("boxes", "scores", "classes")


class SemSegGraph(ExportGraph):
    """Graph of a semantic model. Output sem_seg (K, Ho, Wo) float32: the per-class scores
    the PyTorch model returns (``{"sem_seg": ...}``)."""

    kind = "sem_seg"
    output_names = ("sem_seg",)


def crop_and_resize(maps: Tensor, image_size: Tensor, output_size: Tensor) -> Tensor:
    """(N, C, Hp, Wp) -> (N, C, Ho, Wo): the unpadded part, resized bilinearly
    (align_corners=False) to the output size (Detectron2's ``sem_seg_postprocess``; the mask
    pasting of the one-stage methods)."""
    maps = maps[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(maps, size=(output_size[0], output_size[1]), mode="bilinear", align_corners=False)
