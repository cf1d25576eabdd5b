"""Running an exported file with ONNX Runtime, behind Detectron2's interfaces:

- :class:`ONNXModel`: a Detectron2 model (list of input dicts -> list of ``{"instances"}`` or
  ``{"sem_seg"}``), what ``inference_on_dataset`` and the COCO / semantic evaluators call;
- :class:`ONNXPredictor`: Detectron2's ``DefaultPredictor`` (one BGR uint8 image -> its
  predictions at the image's size, after the config's test resize).

Both check the file's d2seg metadata (written by :func:`d2seg.deploy.export_onnx`): a file
that d2seg did not export, one converted to another opset, or one exported from another
model than the config given, stops with an error that says which.
"""
from typing import Dict, List, Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances

from .export import METADATA_VERSION, config_digest, method_name

__all__ = ["ONNXModel", "ONNXPredictor", "read_metadata"]


def read_metadata(path: str) -> Dict[str, str]:
    """The d2seg metadata of an exported file, checked against the graph itself.

    Raises:
        FileNotFoundError; ValueError when the file has no d2seg metadata, has another metadata
        version, or its graph's opset differs from the opset it was exported with.
    """
    try:
        proto = onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable ONNX file: {e}") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    if "d2seg.version" not in meta:
        raise ValueError(f"{path} has no d2seg metadata: it was not written by d2seg.deploy.export_onnx "
                         "(export it with tools/export_model.py)")
    if meta["d2seg.version"] != METADATA_VERSION:
        raise ValueError(f"{path} has d2seg metadata version {meta['d2seg.version']}, this d2seg reads version "
                         f"{METADATA_VERSION}: export it again with tools/export_model.py")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if str(opset) != meta["d2seg.opset"]:
        raise ValueError(f"{path}: the graph has opset {opset} but was exported with opset {meta['d2seg.opset']}: "
                         "the file was converted or edited after export; export it again with the opset you need "
                         "(tools/export_model.py --opset N)")
    return meta


def _session(path: str, num_threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(path, opts, providers=providers)
    except Exception as e:  # e.g. an opset newer than this onnxruntime knows
        raise RuntimeError(f"onnxruntime {ort.__version__} cannot load {path}: {e}") from e


class ONNXModel:
    """An exported d2seg file as a Detectron2 model (for ``inference_on_dataset`` and evaluators).

    Args:
        path: the .onnx file written by :func:`d2seg.deploy.export_onnx`.
        cfg: the config of the model; checked against the file's config digest. None: the config
            stored in the file. Its TEST.PRECISION must be float32: ONNX Runtime's CPU provider
            has no bfloat16 kernels for these graphs' convolutions and post-processing.
        num_threads: ONNX Runtime intra-op threads (0: its default).
    Call with a list of dicts: ``image`` (3, H, W) in INPUT.FORMAT 0-255 (already resized by the
    test transform), optional ``height`` / ``width`` of the output.
    """

    def __init__(self, path: str, cfg: Optional[CfgNode] = None, num_threads: int = 0):
        if cfg is not None and cfg.TEST.get("PRECISION", "float32") != "float32":
            raise ValueError(
                f"TEST.PRECISION {cfg.TEST.PRECISION}: {path} is an ONNX file, which runs in float32 only "
                "(ONNX Runtime's CPU provider has no bfloat16 kernels for these graphs); use TEST.PRECISION "
                "float32, or the PyTorch model (d2seg.engine.Predictor, tools/train_net.py --eval-only) for bfloat16")
        self.path = path
        self.metadata = meta = read_metadata(path)
        stored = self._stored_cfg(meta)
        if cfg is not None:
            digest = config_digest(cfg)
            if digest != meta["d2seg.config_digest"]:
                raise ValueError(
                    f"{path} was exported from another model than the config given: the file holds "
                    f"{meta['d2seg.method']} (config digest {meta['d2seg.config_digest']}), the config is "
                    f"{method_name(cfg)} (digest {digest}); export this config with tools/export_model.py")
        self.cfg = cfg if cfg is not None else stored
        self.kind = meta["d2seg.kind"]
        self.input_format = meta["d2seg.input_format"]
        self.dynamic = meta["d2seg.dynamic"] == "1"
        self.fixed_size = (int(meta["d2seg.height"]), int(meta["d2seg.width"]))
        self.session = _session(path, num_threads)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @staticmethod
    def _stored_cfg(meta):
        from d2seg.config import get_d2seg_cfg

        cfg = get_d2seg_cfg()
        cfg.merge_from_other_cfg(CfgNode.load_cfg(meta["d2seg.config"]))
        return cfg

    def run(self, image: torch.Tensor, height: int, width: int) -> Dict[str, np.ndarray]:
        """image (3, H, W) -> the graph's outputs by name, at height x width. A fixed-size
        graph receives the image resized (bilinearly) to the size it was exported at."""
        image = image.to(torch.float32)
        if not self.dynamic and tuple(image.shape[-2:]) != self.fixed_size:
            image = F.interpolate(image[None], size=self.fixed_size, mode="bilinear", align_corners=False)[0]
        feeds = {"images": image[None].contiguous().numpy(), "output_size": np.array([height, width], np.int64)}
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def to_result(self, out: Dict[str, np.ndarray], height: int, width: int) -> dict:
        """Graph outputs -> ``{"instances": Instances}`` or ``{"sem_seg": (K, H, W) tensor}``."""
        if self.kind == "sem_seg":
            return {"sem_seg": torch.from_numpy(out["sem_seg"])}
        inst = Instances((height, width))
        inst.pred_boxes = Boxes(torch.from_numpy(out["boxes"]))
        inst.scores = torch.from_numpy(out["scores"])
        inst.pred_classes = torch.from_numpy(out["classes"])
        if "masks" in out:
            inst.pred_masks = torch.from_numpy(out["masks"])
        return {"instances": inst}

    def __call__(self, batched_inputs: List[dict]) -> List[dict]:
        results = []
        for x in batched_inputs:
            h, w = x.get("height", x["image"].shape[-2]), x.get("width", x["image"].shape[-1])
            results.append(self.to_result(self.run(x["image"], h, w), h, w))
        return results


class ONNXPredictor:
    """Detectron2's ``DefaultPredictor`` on an exported file: ``predictor(bgr_uint8_image)`` ->
    ``{"instances": Instances}`` (boxes, scores, classes, masks) or ``{"sem_seg": (K, H, W)}`` at
    the image's size. The image is resized as the config's test transform does
    (ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)); a fixed-size file then
    receives it resized to its size. Runs on ONNX Runtime's CPU provider (its CUDA provider
    when installed).

    Args:
        path: the .onnx file; cfg: see :class:`ONNXModel`; num_threads: ONNX Runtime threads.
    """

    def __init__(self, path: str, cfg: Optional[CfgNode] = None, num_threads: int = 0):
        self.model = ONNXModel(path, cfg, num_threads)
        self.cfg = self.model.cfg
        self.input_format = self.model.input_format
        self.aug = T.ResizeShortestEdge([self.cfg.INPUT.MIN_SIZE_TEST] * 2, self.cfg.INPUT.MAX_SIZE_TEST)

    def __call__(self, original_image: np.ndarray) -> dict:
        """original_image: (H, W, 3) uint8 BGR (as cv2.imread / Detectron2's DefaultPredictor)."""
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return self.model([{"image": image, "height": height, "width": width}])[0]
