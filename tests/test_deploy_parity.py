"""ONNX export with the post-processing in the graph (d2seg.deploy): for every exported method,
ONNX Runtime's final results equal PyTorch's ``model.inference`` on images of two sizes, one
of them returned at twice its size (the rescaling to the original image is in the graph too).

One model per method (the shapes config, seeded initialisation moved off it by noise so that
outputs are far from ties, thresholds lowered so that there are detections), exported once
(dynamic height/width) or once per size (fixed-size methods), shared by the tests of that
method. Criteria (docs/deploy.md): the same number of detections and classes, scores within
1e-4, boxes within 1e-2 px, mask IoU >= 0.999 per detection; semantic argmax on >= 99.9 %
of the pixels.
"""
import os

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

import d2seg  # noqa: F401
from d2seg.deploy import ONNXModel, ONNXPredictor, export_onnx, graph_for
from d2seg.engine import setup_cfg

from conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

# (input height, width), (output height, width)
SIZES = [((64, 96), (128, 192)), ((96, 64), (96, 64))]


def _confident_sparseinst(model):
    # mask logits 20x larger: probabilities far from MASK_THRESHOLD except on mask borders,
    # as after training (random weights leave every pixel near 0.5)
    model.decoder.inst_branch.mask_kernel.weight.mul_(20.0)


def _confident_condinst(model):
    # dynamic mask head parameters 3x larger: sharper masks (logits ~27x)
    model.mask_head.controller.weight.mul_(3.0)


def _confident_blendmask(model):
    # bases 20x larger (the last conv of the basis tower): mask logits 20x larger
    last = [m for m in model.mask_head.basis_module.tower.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last.weight.mul_(20.0)
    if last.bias is not None:
        last.bias.mul_(20.0)


def _blendmask_unclipped(model):
    # and boxes of ~3 strides (random weights regress ~0.1 stride): many of them leave the image
    _confident_blendmask(model)
    model.proposal_generator.fcos_head.bbox_pred.bias.add_(1.5)


def _confident_meinst(model):
    # codes 20x larger: masks far from the mean mask, with foreground
    model.mask_head.mask_pred.weight.mul_(20.0)


def _confident_pointins(model):
    # mask logits 20x larger (the last layer of Detectron2's mask head in the mask branch)
    model.mask_head.mask_branch.mask_head.predictor.weight.mul_(20.0)


def _confident_pointins_retinanet(model):
    # RetinaNet's boxes (exp of the deltas) differ by ~1e-4 px between the runtimes, which moves
    # the pasted masks by as much: sharper masks keep fewer pixels near 0.5 on their borders
    model.mask_branch.mask_head.predictor.weight.mul_(100.0)


def _confident_mask_rcnn(model):
    model.roi_heads.mask_head.predictor.weight.mul_(20.0)


def _confident_solo(model):
    # category scores ~0.2 at init (above SCORE_THR), and mask logits 20x larger
    head = model.ins_head
    head.cate_pred.bias.add_(3.0)
    if isinstance(getattr(head, "mask_pred", None), torch.nn.ModuleList):  # SOLO
        for conv in head.mask_pred:
            conv.weight.mul_(20.0)
    if hasattr(head, "mask_pred_x"):  # Decoupled SOLO: X and Y both mostly on, sharp borders
        for conv in list(head.mask_pred_x) + list(head.mask_pred_y):
            conv.weight.mul_(20.0)
            conv.bias.add_(3.0)
    if hasattr(head, "kernel_pred"):  # SOLOv2's dynamic kernels
        head.kernel_pred.weight.mul_(20.0)


def meinst_encoding(path, size=28, components=60, n=200):
    """A mask encoding (MODEL.MEINST.PATH_COMPONENTS) fitted to random discs and bars, in ``path``."""
    from d2seg.meinst import MaskStatistics, save_encoding

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for _ in range(n):
        c = torch.rand(2, generator=g) * size
        r = 2 + torch.rand(1, generator=g) * size / 2
        masks.append((((yy - c[0]) ** 2 + (xx - c[1]) ** 2) <= r ** 2).float())
    stats = MaskStatistics(size, sigmoid=True)
    stats.update(torch.stack(masks))
    save_encoding(path, stats.fit(components, whiten=True))
    return path


# method -> (config, overrides, optional in-place change of the perturbed weights)
METHODS = {
    "sparseinst": ("SparseInst/sparse_inst_r18_giam_shapes.yaml", ["MODEL.SPARSE_INST.CLS_THRESHOLD", "0.05",
                                                                "MODEL.SPARSE_INST.MAX_DETECTIONS", "20"],
                   _confident_sparseinst),
    "meinst": ("MEInst/meinst_R18_shapes.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", "0.005",
                                                "MODEL.MEINST.PATH_COMPONENTS", meinst_encoding], _confident_meinst),
    "pointins_fcos": ("PointINS/pointins_fcos_R18_shapes.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", "0.02"],
                      _confident_pointins),
    "pointins_retinanet": ("PointINS/pointins_retinanet_R18_shapes.yaml",
                           ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.02", "TEST.DETECTIONS_PER_IMAGE", "20"],
                           _confident_pointins_retinanet),
    "pointrend_rcnn": ("PointRend/pointrend_rcnn_R18_shapes.yaml", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.25"], None),
    "mask_rcnn": ("quick/mask_rcnn_shapes.yaml", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.25"], _confident_mask_rcnn),
    "sparseinst_loc": ("SparseInst/sparse_inst_r18_giam_loc_shapes.yaml",
                       ["MODEL.SPARSE_INST.CLS_THRESHOLD", "0.05", "MODEL.SPARSE_INST.MAX_DETECTIONS", "20"],
                       _confident_sparseinst),
    "sparseinst_refiner": ("PointRend/pointrend_sparseinst_r18_giam_shapes.yaml",
                           ["MODEL.SPARSE_INST.CLS_THRESHOLD", "0.05", "MODEL.SPARSE_INST.MAX_DETECTIONS", "20"],
                           _confident_sparseinst),
    "fcos": ("FCOS/fcos_R18_shapes.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", "0.02"], None),
    "blendmask": ("BlendMask/blendmask_R18_shapes.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", "0.005"],
                  _confident_blendmask),
    # AdelaiDet's crop (the COCO configs): the bases cropped with the boxes before clipping
    "blendmask_unclipped": ("BlendMask/blendmask_R18_shapes.yaml",
                            ["MODEL.FCOS.INFERENCE_TH_TEST", "0.005", "MODEL.BLENDMASK.CROP_UNCLIPPED_BOXES", "True"],
                            _blendmask_unclipped),
    "condinst": ("CondInst/condinst_R18_shapes.yaml", ["MODEL.FCOS.INFERENCE_TH_TEST", "0.005"], _confident_condinst),
    "semantic_fpn": ("quick/semantic_fpn_shapes.yaml", [], None),
    "solo": ("SOLO/solo_shapes.yaml", [], _confident_solo),
    "decoupled_solo": ("SOLO/decoupled_solo_shapes.yaml", [], _confident_solo),
    "solov2": ("SOLO/solov2_shapes.yaml", [], _confident_solo),
    "pointrend_semantic": ("PointRend/pointrend_semantic_R18_shapes.yaml", [], None),
}


def shapes_like_image(h, w, seed):
    """A noise image with a bright and a dark rectangle, (3, h, w) float 0-255."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, h, w, generator=g) * 60 + 80
    x[:, h // 4: h // 2, w // 5: w // 2] = 240
    x[:, h // 2:, w // 2: w - 4] = 20
    return x


class Exported:
    """A method's model, its config and its ONNX file(s): ``onnx_for(h, w)``."""

    def __init__(self, method, tmp_dir, extra_opts=()):
        config, opts, adjust = METHODS[method]
        opts = list(opts) + list(extra_opts)
        # a callable in the overrides makes its value: a file in the temporary folder
        opts = [o(os.path.join(tmp_dir, "file.npz")) if callable(o) else o for o in opts]
        self.cfg = setup_cfg(os.path.join(CONFIGS, config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + opts,
                             follow_dataset_classes=False)
        torch.manual_seed(0)
        self.model = build_model(self.cfg).eval()
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            if adjust:
                adjust(self.model)
        self.dynamic = graph_for(self.model).dynamic_size
        self.tmp_dir = tmp_dir
        self.files = {}

    def onnx_for(self, h, w):
        key = None if self.dynamic else (h, w)
        if key not in self.files:
            path = os.path.join(self.tmp_dir, f"model_{h}x{w}.onnx")
            if self.dynamic:  # traced at another size than the two tested
                export_onnx(self.model, path, self.cfg)
            else:
                export_onnx(self.model, path, self.cfg, height=h, width=w)
            self.files[key] = ONNXModel(path, self.cfg)
        return self.files[key]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(method):
        if method not in cache:
            cache[method] = Exported(method, str(tmp_path_factory.mktemp(method)))
        return cache[method]
    return get


def mask_iou(a, b):
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def assert_same_results(ref, out, ignore=None):
    """PyTorch's and ONNX Runtime's results of one image agree (module doc's criteria);
    ``ignore`` (R, Ho, Wo) bool, in ``ref``'s order: mask pixels left out of the comparison."""
    if "sem_seg" in ref:
        a, b = ref["sem_seg"], out["sem_seg"]
        assert a.shape == b.shape and b.dtype == torch.float32
        assert (a.argmax(0) == b.argmax(0)).float().mean() >= 0.999
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
        assert len(a.argmax(0).unique()) > 1  # not a constant map
        return
    a, b = ref["instances"], out["instances"]
    assert a.image_size == b.image_size
    assert len(a) == len(b) > 0
    order = a.scores.argsort(descending=True)
    a, b = a[order], b[b.scores.argsort(descending=True)]
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(b.scores, a.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, atol=1e-2, rtol=0)
    if a.has("pred_masks"):
        assert b.pred_masks.dtype == torch.bool and b.pred_masks.shape == a.pred_masks.shape
        am, bm = a.pred_masks, b.pred_masks
        if ignore is not None:
            keep = ~ignore[order]
            am, bm = am & keep, bm & keep
        assert mask_iou(am, bm).min() >= 0.999
        assert am.flatten(1).any(1).sum() > 0  # some non-empty masks


# In the default suite: one method per kind of graph (FCOS's NMS, CondInst's dynamic head,
# BlendMask's RoiAlign and pasting, PointINS's mask branch, SOLOv2's Matrix NMS, SparseInst,
# PointRend's two stages and subdivision, SparseInst's PointRend refiner, a semantic model); the
# others share those parts and run with -m slow (an export costs 5-10 s on 2 busy cores).
SLOW = {"solo", "decoupled_solo", "meinst", "pointrend_semantic", "pointins_retinanet", "mask_rcnn",
        "sparseinst_loc"}


def _record_unclipped_crops(monkeypatch):
    """For BlendMask with CROP_UNCLIPPED_BOXES, lists filled by the next inferences: the boxes
    it crops its bases with, and per image the pixels of its pasted masks (R, Ho, Wo) whose
    probability is within 1e-6 of MASK_THRESHOLD. A crop beyond the map's border gives the
    bases 0 there, mask logit 0, probability 0.5 exactly: at MASK_THRESHOLD 0.5 (the COCO
    configs') the pasted pixels of those plateaus are ties that the rounding of the bilinear
    weights of the pasting decides (in PyTorch itself ~1 % of them are False)."""
    import copy

    from detectron2.modeling.postprocessing import detector_postprocess

    from d2seg.blendmask.blendmask import BlendMaskHead

    boxes, ties = [], []
    unclipped_boxes, postprocess = BlendMaskHead._unclipped_boxes, BlendMaskHead.postprocess

    def record_boxes(fcos_outputs, image, det):
        boxes.append(unclipped_boxes(fcos_outputs, image, det))
        return boxes[-1]

    def record_ties(head, result, oh, ow):
        lo, hi = (detector_postprocess(copy.deepcopy(result), oh, ow, mask_threshold=head.mask_threshold + d).pred_masks
                  for d in (-1e-6, 1e-6))
        ties.append(lo & ~hi)
        return postprocess(head, result, oh, ow)
    monkeypatch.setattr(BlendMaskHead, "_unclipped_boxes", staticmethod(record_boxes))
    monkeypatch.setattr(BlendMaskHead, "postprocess", record_ties)
    return boxes, ties


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0][0]}x{s[0][1]}to{s[1][0]}x{s[1][1]}")
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m
                                    for m in sorted(METHODS)])
def test_onnxruntime_equals_pytorch(exported, method, size, monkeypatch):
    e = exported(method)
    (h, w), (oh, ow) = size
    inputs = [{"image": shapes_like_image(h, w, seed=h), "height": oh, "width": ow}]
    unclipped = getattr(getattr(e.model, "mask_head", None), "crop_unclipped_boxes", False)
    if unclipped:
        crop_boxes, ties = _record_unclipped_crops(monkeypatch)
    with torch.no_grad():
        ref = e.model(inputs)[0]
    ignore = None
    if unclipped:
        # the case this tests: crops that leave the image by more than a basis pixel (4 px)
        # (samples outside the map, the RoIAlign's out-of-map rules) and crops inside it
        boxes = torch.cat(crop_boxes)
        outside = (boxes[:, :2] < -4).any(1) | (boxes[:, 2] > w + 4) | (boxes[:, 3] > h + 4)
        assert outside.sum() >= 5 and (boxes[:, :2] >= 0).all(1).logical_and(boxes[:, 2] <= w).sum() >= 1
        (ignore,) = ties
        assert ignore.any()  # the plateaus are there; the masks are compared off them
    assert_same_results(ref, e.onnx_for(h, w)(inputs)[0], ignore)


def test_predictor_equals_default_predictor(exported, tmp_path):
    """ONNXPredictor resizes as DefaultPredictor (the config's ResizeShortestEdge) and returns
    the results at the original size."""
    e = exported("fcos")
    e.onnx_for(0, 0)
    predictor = ONNXPredictor(e.files[None].path)  # the config stored in the file
    reference = DefaultPredictor(e.cfg)
    reference.model = e.model
    image = (shapes_like_image(50, 70, seed=3).permute(1, 2, 0).numpy()).astype(np.uint8)  # H, W, BGR
    out = predictor(image)
    assert out["instances"].image_size == (50, 70)
    assert_same_results(reference(image), out)


# overrides that leave no detection: the graph must hold for R = 0 (every reshape, norm and
# reduction on the detections)
NO_DETECTIONS = {
    "sparseinst": ["MODEL.SPARSE_INST.CLS_THRESHOLD", "1.0"],
    "sparseinst_loc": ["MODEL.SPARSE_INST.CLS_THRESHOLD", "1.0"],
    "sparseinst_refiner": ["MODEL.SPARSE_INST.CLS_THRESHOLD", "1.0"],
    "fcos": ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"],
    "condinst": ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"],
    "blendmask": ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"],
    "blendmask_unclipped": ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"],
    "meinst": ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"],
    "pointins_fcos": ["MODEL.FCOS.INFERENCE_TH_TEST", "1.0"],
    "pointins_retinanet": ["MODEL.RETINANET.SCORE_THRESH_TEST", "1.0"],
    "pointrend_rcnn": ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"],
    "mask_rcnn": ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"],
    "solo": ["MODEL.SOLO.SCORE_THR", "1.0"],
    "decoupled_solo": ["MODEL.SOLO.SCORE_THR", "1.0"],
    "solov2": ["MODEL.SOLO.SCORE_THR", "1.0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(NO_DETECTIONS))
def test_image_without_detections(method, tmp_path):
    """An image on which nothing passes the score threshold: empty results of the right shapes."""
    e = Exported(method, str(tmp_path), NO_DETECTIONS[method])
    inputs = [{"image": shapes_like_image(64, 96, seed=1), "height": 80, "width": 120}]
    with torch.no_grad():
        ref = e.model(inputs)[0]["instances"]
    out = e.onnx_for(64, 96)(inputs)[0]["instances"]
    assert len(ref) == len(out) == 0
    assert out.pred_boxes.tensor.shape == (0, 4) and out.scores.shape == (0,)
    if ref.has("pred_masks"):
        assert tuple(out.pred_masks.shape) == (0, 80, 120)
