"""MODEL.FAST_INFERENCE (d2seg.layers.inference_speed): FrozenBN folded into the convolutions
and channels-last activations at inference change nothing but float rounding, and leave
training, gradients and checkpoints alone."""
import copy
import io

import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from d2seg.layers.inference_speed import FoldedBatchNormConv2d, fold_frozen_batchnorm, to_inference_layout


def _conv_bn(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(6)
    bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(6, generator=g))
    bn.running_mean.copy_(torch.randn(6, generator=g))
    bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
    conv = Conv2d(4, 6, 3, padding=1, bias=bias, norm=bn, activation=nn.ReLU())
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(6, generator=g))
    return conv


def _reference(conv, x):
    """conv -> FrozenBN -> ReLU written out (an independent computation)."""
    bn = conv.norm
    y = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    y = (y - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
    return torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])


@pytest.mark.parametrize("bias", [False, True])
def test_folded_conv_matches_conv_then_frozen_bn(bias):
    m = nn.Sequential(_conv_bn(bias=bias))
    keys = list(m.state_dict())
    assert fold_frozen_batchnorm(m) == 1 and type(m[0]) is FoldedBatchNormConv2d
    assert list(m.state_dict()) == keys  # checkpoints unchanged
    x = torch.randn(2, 4, 9, 11)
    m.eval()
    with torch.no_grad():
        y = m(x)
        assert "_folded_cache" in m[0].__dict__  # the folded path ran
    assert torch.allclose(y, _reference(m[0], x), atol=1e-5, rtol=1e-5)


def test_training_and_autograd_take_the_unfolded_path():
    conv = _conv_bn()
    plain = copy.deepcopy(conv)
    fold_frozen_batchnorm(conv)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    conv.eval()
    y = conv(x)  # grad enabled: exactly Conv2d's computation
    assert torch.equal(y, plain(x))
    y.sum().backward()
    assert conv.weight.grad is not None and "_folded_cache" not in conv.__dict__


def test_cache_follows_the_weights():
    conv = _conv_bn()
    fold_frozen_batchnorm(conv)
    conv.eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        conv(x)
        other = _conv_bn(seed=1)
        conv.load_state_dict(other.state_dict())  # in-place copies: new versions
        y = conv(x)
    assert torch.allclose(y, _reference(other, x), atol=1e-5, rtol=1e-5)


def test_copies_and_pickles_drop_the_cache():
    conv = _conv_bn()
    fold_frozen_batchnorm(conv)
    conv.eval()
    with torch.no_grad():
        conv(torch.randn(1, 4, 4, 4))
    assert "_folded_cache" in conv.__dict__
    assert "_folded_cache" not in copy.deepcopy(conv).__dict__
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is FoldedBatchNormConv2d and "_folded_cache" not in loaded.__dict__


def test_only_conv_with_frozen_bn_is_folded():
    m = nn.Sequential(Conv2d(3, 4, 1), Conv2d(4, 4, 1, norm=nn.GroupNorm(2, 4)), _conv_bn())
    assert fold_frozen_batchnorm(m) == 1
    assert [type(x) for x in m] == [Conv2d, Conv2d, FoldedBatchNormConv2d]


def test_inference_layout():
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        y = to_inference_layout(x, training=False)
        assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x)
        assert to_inference_layout(x, training=True) is x
    assert to_inference_layout(x, training=False) is x  # autograd on: unchanged


def _build(config, fast, opts=()):
    """A model from a small shapes config with FrozenBN in the backbone (what the key folds),
    random running statistics, and ``MODEL.FAST_INFERENCE`` = ``fast``."""
    from d2seg.config import get_d2seg_cfg
    from detectron2.modeling import build_model

    cfg = get_d2seg_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MODEL.FAST_INFERENCE", fast, "MODEL.RESNETS.NORM", "FrozenBN"] + list(opts))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, b in model.named_buffers():
            if k.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif k.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    assert getattr(model, "fast_inference", False) == fast
    folded = sum(type(m) is FoldedBatchNormConv2d for m in model.backbone.modules())
    assert (folded > 0) == fast
    return model


def _run(model, height=64, width=96):
    """One inference on a fixed random image; also records whether the backbone's input was
    channels-last."""
    seen = {}
    h = model.backbone.register_forward_pre_hook(
        lambda m, args: seen.update(channels_last=args[0].is_contiguous(memory_format=torch.channels_last)
                                    and not args[0].is_contiguous()))
    g = torch.Generator().manual_seed(2)
    image = (torch.rand(3, height, width, generator=g) * 255).to(torch.uint8)
    with torch.no_grad():
        out = model([{"image": image}])[0]
    h.remove()
    return out, seen["channels_last"]


def test_fast_inference_model_same_results():
    """A small OneStageDetector (FCOS R-18 shapes config) with and without the key."""
    outs = []
    for fast in (False, True):
        model = _build("configs/FCOS/fcos_R18_shapes.yaml", fast, ["MODEL.FCOS.INFERENCE_TH_TEST", 0.0])
        out, channels_last = _run(model)
        assert channels_last == fast
        outs.append(out["instances"])
    assert len(outs[0]) == len(outs[1]) > 0
    assert torch.allclose(outs[0].scores, outs[1].scores, atol=1e-5)


def test_fast_inference_sparseinst_same_results():
    """SparseInst (R-18 shapes config): the same detections with and without the key."""
    outs = []
    for fast in (False, True):
        model = _build("configs/SparseInst/sparse_inst_r18_giam_shapes.yaml", fast,
                       ["MODEL.SPARSE_INST.CLS_THRESHOLD", 0.0])
        out, channels_last = _run(model)
        assert channels_last == fast
        outs.append(out["instances"])
    a, b = outs
    assert len(a) == len(b) == 100
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    # masks: only pixels within rounding of the threshold may flip
    assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1.0)


def test_fast_inference_semantic_segmentor_same_results():
    """D2SegSemanticSegmentor (PointRend semantic R-18 shapes config): Detectron2's
    SemanticSegmentor's logits with and without the key (every point re-predicted at each
    subdivision step, so the result does not hinge on which points are most uncertain)."""
    from detectron2.modeling import SemanticSegmentor

    from d2seg.pointrend import D2SegSemanticSegmentor

    opts = ["MODEL.META_ARCHITECTURE", "D2SegSemanticSegmentor",
            "MODEL.POINTREND.SEM_SEG.SUBDIVISION_NUM_POINTS", 64 * 96]
    outs = []
    for fast in (False, True):
        model = _build("configs/PointRend/pointrend_semantic_R18_shapes.yaml", fast, opts)
        assert type(model) is D2SegSemanticSegmentor and isinstance(model, SemanticSegmentor)
        out, channels_last = _run(model)
        assert channels_last == fast
        outs.append(out["sem_seg"])
    assert outs[0].shape == (6, 64, 96)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    # the same parameters as Detectron2's SemanticSegmentor: its checkpoints load unchanged
    plain = _build("configs/PointRend/pointrend_semantic_R18_shapes.yaml", False)
    assert type(plain) is SemanticSegmentor and list(plain.state_dict()) == list(model.state_dict())
