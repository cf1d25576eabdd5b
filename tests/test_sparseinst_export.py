"""SparseInst ONNX export: a real export of a small model for a fixed input size, run by
onnxruntime, matches PyTorch (scores, labels, masks) and reproduces the model's own
thresholded inference."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch

import d2seg  # noqa: F401
from d2seg.sparseinst.export import SparseInstONNX, export_onnx
from detectron2.modeling import build_model

from test_sparseinst import tiny_cfg


def test_onnx_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(num_masks=12, num_classes=4)
    cfg.MODEL.SPARSE_INST.CLS_THRESHOLD = 0.05
    model = build_model(cfg).eval()
    with torch.no_grad():  # move off the init so outputs are far from ties
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # 160 x 224 makes C5 5 x 7: no PPM pool size (2, 3, 6) divides it, the case where a
    # fixed AvgPool2d in place of adaptive pooling goes wrong.
    h, w = 160, 224
    path = os.path.join(tmp_path, "sparseinst.onnx")
    wrapper = export_onnx(model, path, h, w)
    onnx.checker.check_model(onnx.load(path))

    image = torch.rand(1, 3, h, w) * 255
    with torch.no_grad():
        ref_scores, ref_labels, ref_masks = wrapper(image)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == ["scores", "labels", "masks"]
    scores, labels, masks = sess.run(None, {"images": image.numpy()})
    assert scores.shape == (1, 12) and labels.shape == (1, 12) and masks.shape == (1, 12, h, w)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(masks, ref_masks.numpy(), atol=1e-5, rtol=1e-4)
    assert (labels == ref_labels.numpy()).all()
    assert ref_scores.std() > 1e-3 and ref_masks.std() > 1e-3  # not a trivial constant output

    # The ONNX outputs, thresholded, give the model's own inference for an H x W image.
    with torch.no_grad():
        res = model([{"image": image[0], "height": h, "width": w}])[0]["instances"]
    keep = scores[0] > model.cls_threshold
    assert keep.sum() == len(res) > 0
    np.testing.assert_allclose(scores[0][keep], res.scores.numpy(), atol=1e-5, rtol=1e-4)
    onnx_binary = masks[0][keep] > model.mask_threshold
    agree = (onnx_binary == res.pred_masks.numpy()).mean()
    assert agree > 0.9999, agree


def test_export_rejects_sizes_not_divisible_by_32(tmp_path):
    model = build_model(tiny_cfg()).eval()
    try:
        export_onnx(model, os.path.join(tmp_path, "x.onnx"), 100, 128)
    except ValueError as e:
        assert "divisible by 32" in str(e)
    else:
        raise AssertionError("expected a ValueError")
    assert isinstance(SparseInstONNX(model), torch.nn.Module)
