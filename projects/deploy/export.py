"""``export_onnx``: a d2seg model and its config -> one ONNX file with the whole inference
(pre-processing, network, post-processing) and d2seg's metadata.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. The post-processing
of every method is data-dependent (thresholds keep a varying number of candidates); the
tracer records those steps as ONNX NonZero / TopK / NonMaxSuppression / Gather with dynamic
lengths, while torch 2.14's dynamo exporter needs every data-dependent size declared to
torch.export and fails on the methods' ``nonzero`` / boolean indexing (docs/deploy.md).
"""
import hashlib
import logging
import os
import warnings
from typing import Dict, Optional

import onnx
import torch
from torch import nn

from .graph import graph_for

__all__ = ["export_onnx", "config_digest", "check_exportable", "DEFAULT_OPSET", "METADATA_VERSION", "ExportError"]

DEFAULT_OPSET = 17
METADATA_VERSION = "1"
logger = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """A model (or one of its modules) that cannot be exported to ONNX."""


def config_digest(cfg) -> str:
    """sha256 of what defines the model's graph: ``cfg.MODEL`` (without WEIGHTS and DEVICE)
    and ``cfg.INPUT.FORMAT``; the weights file and the device do not change the graph."""
    model_cfg = cfg.MODEL.clone()
    model_cfg.defrost()
    model_cfg.WEIGHTS = ""
    model_cfg.DEVICE = ""
    text = model_cfg.dump() + "\nINPUT.FORMAT: " + cfg.INPUT.FORMAT
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def method_name(cfg) -> str:
    """MODEL.META_ARCHITECTURE, with the one-stage mask head or the ROI mask head when there is one
    (e.g. ``OneStageDetector/CondInstMaskHead``)."""
    name = cfg.MODEL.META_ARCHITECTURE
    head = cfg.MODEL.get("ONE_STAGE_MASK_HEAD", None)
    if name == "OneStageDetector" and head is not None and head.NAME:
        name += "/" + head.NAME
    return name


def check_exportable(model: nn.Module) -> None:
    """ExportError naming the first module that has no ONNX export (deformable convolutions:
    ONNX Runtime has no kernel for the DeformConv op on the CPU)."""
    from torchvision.ops import DeformConv2d

    from d2seg.fcos.deform_conv import ModulatedDeformConv2d

    unsupported = (ModulatedDeformConv2d, DeformConv2d)
    try:  # Detectron2's deformable convolutions (placeholders when its _C is missing)
        from detectron2.layers import DeformConv, ModulatedDeformConv

        unsupported += (DeformConv, ModulatedDeformConv)
    except ImportError:  # pragma: no cover
        pass
    for name, m in model.named_modules():
        if isinstance(m, unsupported):
            raise ExportError(
                f"cannot export module '{name}' ({type(m).__name__}): deformable convolution has no ONNX Runtime "
                "CPU kernel. Export a config without deformable convolutions (e.g. MODEL.FCOS.USE_DEFORMABLE False, "
                "MODEL.RESNETS.DEFORM_ON_PER_STAGE all False) and weights trained for it.")


def _metadata(cfg, graph, opset: int, dynamic: bool, height: int, width: int) -> Dict[str, str]:
    return {
        "d2seg.version": METADATA_VERSION,
        "d2seg.method": method_name(cfg),
        "d2seg.config_digest": config_digest(cfg),
        "d2seg.input_format": cfg.INPUT.FORMAT,
        "d2seg.opset": str(opset),
        "d2seg.size_divisibility": str(graph.size_divisibility),
        "d2seg.kind": graph.kind,
        "d2seg.outputs": ",".join(graph.output_names),
        "d2seg.dynamic": "1" if dynamic else "0",
        "d2seg.height": str(height),
        "d2seg.width": str(width),
        "d2seg.config": cfg.dump(),
    }


def export_onnx(model: nn.Module, path: str, cfg, *, height: Optional[int] = None, width: Optional[int] = None,
                dynamic: Optional[bool] = None, opset: int = DEFAULT_OPSET) -> nn.Module:
    """Export ``model`` (built from ``cfg``, in eval mode, on the CPU) to the ONNX file ``path``.

    Args:
        model: a d2seg model (any meta-architecture in :data:`d2seg.deploy.graph.GRAPHS`).
        path: the .onnx file written.
        cfg: the model's config (its digest, input format and test transform go in the file).
        height, width: the input size to trace at (a fixed-size graph when ``dynamic`` is
            False). Default: INPUT.MIN_SIZE_TEST squared, rounded up to the size divisibility.
        dynamic: dynamic input height and width (default: when no height/width is given and the
            method's graph allows it).
        opset: ONNX opset.
    Returns:
        The export graph (an nn.Module giving the same outputs in PyTorch).
    Raises:
        ExportError: a module with no ONNX export (named); ValueError: a model with no graph,
        or dynamic sizes asked of a graph that has a fixed size.
    """
    check_exportable(model)
    model = model.eval()
    graph = graph_for(model).eval()
    if dynamic is None:
        dynamic = height is None and width is None and graph.dynamic_size
    if dynamic and not graph.dynamic_size:
        raise ValueError(f"{type(model).__name__} exports only at a fixed input size (docs/deploy.md): "
                         "give --height and --width instead of --dynamic")
    div = graph.size_divisibility
    side = -(-int(cfg.INPUT.MIN_SIZE_TEST) // div) * div
    height, width = int(height or side), int(width or side)
    if not graph.dynamic_size and (height % div or width % div):
        raise ValueError(f"{type(model).__name__} exports at a fixed size that is a multiple of {div} "
                         f"(docs/deploy.md); got {height}x{width}")
    images = torch.zeros(1, 3, height, width, device=graph.pixel_mean.device)
    output_size = torch.tensor([height, width], dtype=torch.int64)
    names = list(graph.output_names)
    dynamic_axes = {}
    if dynamic:
        dynamic_axes["images"] = {2: "height", 3: "width"}
    if graph.kind == "instances":
        for n in names:
            dynamic_axes[n] = {0: "detections"}
        if "masks" in names:
            dynamic_axes["masks"] = {0: "detections", 1: "out_height", 2: "out_width"}
    else:
        dynamic_axes["sem_seg"] = {1: "out_height", 2: "out_width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        torch.onnx.export(graph, (images, output_size), path, dynamo=False, opset_version=opset,
                          input_names=["images", "output_size"], output_names=names,
                          dynamic_axes=dynamic_axes, do_constant_folding=True)
    proto = onnx.load(path)
    for k, v in _metadata(cfg, graph, opset, dynamic, height, width).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, path)
    logger.info(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB): {method_name(cfg)}, opset {opset}, "
                + ("dynamic height/width" if dynamic else f"fixed {height}x{width}"))
    return graph
