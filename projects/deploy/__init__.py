"""d2seg.deploy: every method leaves Python as one ONNX file with its whole inference
(normalisation, padding, network, thresholds, top-k, NMS, mask assembly) and runs under
ONNX Runtime behind Detectron2's predictor and model interfaces. See docs/deploy.md.

    from d2seg.deploy import export_onnx, ONNXPredictor
    export_onnx(model, "model.onnx", cfg)            # dynamic height/width where possible
    predictions = ONNXPredictor("model.onnx")(bgr_image)
"""
# the methods' graphs register themselves
from . import blendmask, condinst, fcos, meinst, pointins, rcnn, semantic, solo, sparseinst  # noqa: F401
from .export import DEFAULT_OPSET, ExportError, check_exportable, config_digest, export_onnx
from .graph import GRAPHS, graph_for
from .predictor import ONNXModel, ONNXPredictor, read_metadata

__all__ = ["export_onnx", "ONNXPredictor", "ONNXModel", "ExportError", "check_exportable", "config_digest",
           "read_metadata", "graph_for", "GRAPHS", "DEFAULT_OPSET"]
