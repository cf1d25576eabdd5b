"""ONNX export of SparseInst for a fixed input size.

The exported graph takes raw images (B, 3, H, W) in the model's INPUT.FORMAT channel order
and 0-255 range, H and W multiples of 32, and returns, with no sorting and no NMS:

- ``scores`` (B, N): rescored probability sqrt(p * s) of the best class (times the
  maskness when MODEL.SPARSE_INST.MASK_RESCORE);
- ``labels`` (B, N) int64: that class;
- ``masks`` (B, N, H, W): mask probabilities at the input size.

Keep instances with ``scores > CLS_THRESHOLD`` and pixels with ``masks > MASK_THRESHOLD``;
this reproduces :meth:`SparseInst.inference` for an image of exactly H x W.

    python -m d2seg.sparseinst.export --config-file X.yaml --height 640 --width 640 \
        --output sparseinst.onnx [KEY VALUE ...]
"""
import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .sparseinst import maskness, rescored_probabilities


class SparseInstONNX(nn.Module):
    """Export wrapper around a :class:`SparseInst` model. forward(images (B, 3, H, W)) ->
    (scores (B, N), labels (B, N), masks (B, N, H, W))."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.mask_threshold = model.mask_threshold
        self.mask_rescore = model.mask_rescore

    def forward(self, images: torch.Tensor):
        h, w = images.shape[-2:]
        x = (images - self.model.pixel_mean) / self.model.pixel_std
        out = self.model.predict(x)
        probs = rescored_probabilities(out["pred_logits"], out["pred_scores"])
        scores, labels = probs.max(dim=-1)
        masks = out["pred_masks"].sigmoid()
        if self.mask_rescore:
            b, n = masks.shape[:2]
            scores = scores * maskness(masks.flatten(0, 1), self.mask_threshold).view(b, n)
        masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
        return scores, labels, masks


def export_onnx(model, path: str, height: int, width: int, batch_size: int = 1, opset: int = 17) -> SparseInstONNX:
    """Trace ``model`` (a SparseInst) for inputs (batch_size, 3, height, width) into ``path``."""
    div = model.size_divisibility
    if height % div or width % div:
        raise ValueError(f"ONNX export needs height and width divisible by {div}, got {height}x{width}")
    wrapper = SparseInstONNX(model).eval()
    dummy = torch.zeros(batch_size, 3, height, width, device=model.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(wrapper, (dummy,), path, dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["scores", "labels", "masks"], do_constant_folding=True)
    return wrapper


def main(argv=None):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2seg.config import get_d2seg_cfg

    parser = argparse.ArgumentParser(description="Export a SparseInst model to ONNX for a fixed input size")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--output", default="sparseinst.onnx")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    export_onnx(model, args.output, args.height, args.width)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
