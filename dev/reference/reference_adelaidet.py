"""Fixture builders for aim-uofa/AdelaiDet (see dev/reference/reference_fixtures.py).

    python dev/reference/reference_fixtures.py --reference adelaidet-fcos --checkout /path/to/AdelaiDet
    python dev/reference/reference_fixtures.py --reference adelaidet-meinst --checkout /path/to/AdelaiDet
    python dev/reference/reference_fixtures.py --reference adelaidet-meinst-dcn --checkout /path/to/AdelaiDet
    python dev/reference/reference_fixtures.py --reference adelaidet-solov2 --checkout /path/to/AdelaiDet

AdelaiDet on CPU without its compiled part. ``adet._C`` (BezierAlign, DefROIAlign: CUDA/C++
sources that do not build against PyTorch 2.14) is replaced before import by a stub module
whose functions raise; none of the references built here calls them (they serve ABCNet and
the deformable RoI align of other methods). ``skimage`` (imported by CondInst for BoxInst's
LAB colour similarity, unused with full mask supervision) is stubbed the same way when it is
not installed. :func:`stub_report` says what was stubbed; the fixture's "notes" record it.
No CUDA-only op lies on the FCOS, MEInst (without DCN) or SOLOv2 paths. MEInst with DCN uses
Detectron2's DeformConv, which needs ``detectron2._C``: :func:`install_cpu_deform_conv` replaces
it with an exact CPU equivalent (torchvision's ``deform_conv2d``, what Detectron2 itself calls
on CPU), and the fixture's notes say so. MEInst at AdelaiDet's HEAD needs two patches (:func:`patch_meinst_layout`,
:func:`patch_meinst_iou_loss`; recorded in the notes too), and its random clamp of the training
targets is replayed from recorded draws (:class:`_RecordedRandLike`).

Each model is built from AdelaiDet's own config of the published checkpoint, narrowed by
:data:`NARROW` or :data:`NARROW_FOR` (the same keys narrow d2seg's shipped config: the test
applies them and nothing else; SOLOv2's are MODEL.SOLOV2.* in AdelaiDet, MODEL.SOLO.* here), with random weights from the seed (FrozenBN statistics randomised, the
classification prior raised so that detections pass the thresholds). Recorded on the fixture
images: the head outputs (eval), the final results (eval) and the training losses (train mode,
same weights, same batch).
"""
import sys
import types
from typing import Dict, List

import torch

from reference_fixtures import on_path, seed_all, synthetic_images, to_detectron2_inputs, instances_to_dict

REFERENCES = {
    "adelaidet-fcos": "AdelaiDet FCOS R_50_1x (configs/FCOS-Detection/R_50_1x.yaml)",
    "adelaidet-meinst": "AdelaiDet MEInst R_50_1x without DCN "
                        "(configs/MEInst-InstanceSegmentation/MEInst_R_50_1x_none.yaml)",
    "adelaidet-solov2": "AdelaiDet SOLOv2 R50_3x (configs/SOLOv2/R50_3x.yaml)",
    "adelaidet-meinst-dcn": "AdelaiDet MEInst R_50_1x with DCNv1 in the towers' last layers "
                            "(configs/MEInst-InstanceSegmentation/MEInst_R_50_1x.yaml)",
}

REFERENCE_CONFIG = {
    "adelaidet-fcos": "configs/FCOS-Detection/R_50_1x.yaml",
    "adelaidet-meinst": "configs/MEInst-InstanceSegmentation/MEInst_R_50_1x_none.yaml",
    "adelaidet-solov2": "configs/SOLOv2/R50_3x.yaml",
    "adelaidet-meinst-dcn": "configs/MEInst-InstanceSegmentation/MEInst_R_50_1x.yaml",
}

D2SEG_CONFIG = {
    "adelaidet-fcos": "configs/FCOS/R_50_1x.yaml",
    "adelaidet-meinst": "configs/MEInst/MEInst_R_50_1x.yaml",
    "adelaidet-solov2": "configs/SOLO/SOLOv2_R_50_3x.yaml",
    "adelaidet-meinst-dcn": "configs/MEInst/MEInst_R_50_1x_dcn.yaml",
}

# Width overrides valid for both AdelaiDet's and d2seg's configs (R-50 layout, narrow).
NARROW = [
    ("MODEL.RESNETS.STEM_OUT_CHANNELS", 16),
    ("MODEL.RESNETS.RES2_OUT_CHANNELS", 16),
    ("MODEL.RESNETS.WIDTH_PER_GROUP", 4),
    ("MODEL.FPN.OUT_CHANNELS", 32),
]

# Narrower still where the head is larger (MEInst: a third tower and a 60 x 784 encoding),
# so that the fixture stays under 1.5 MB. FPN channels stay 32 (GroupNorm with 32 groups).
NARROW_FOR = {
    "adelaidet-meinst": [
        ("MODEL.RESNETS.STEM_OUT_CHANNELS", 8),
        ("MODEL.RESNETS.RES2_OUT_CHANNELS", 8),
        ("MODEL.RESNETS.WIDTH_PER_GROUP", 2),
        ("MODEL.FPN.OUT_CHANNELS", 32),
    ],
    "adelaidet-meinst-dcn": [
        ("MODEL.RESNETS.STEM_OUT_CHANNELS", 8),
        ("MODEL.RESNETS.RES2_OUT_CHANNELS", 8),
        ("MODEL.RESNETS.WIDTH_PER_GROUP", 2),
        ("MODEL.FPN.OUT_CHANNELS", 32),
    ],
    # d2seg's names; AdelaiDet's are MODEL.SOLOV2.* with the same leaves (see _opts)
    "adelaidet-solov2": [
        ("MODEL.RESNETS.STEM_OUT_CHANNELS", 8),
        ("MODEL.RESNETS.RES2_OUT_CHANNELS", 8),
        ("MODEL.RESNETS.WIDTH_PER_GROUP", 2),
        ("MODEL.FPN.OUT_CHANNELS", 32),
        ("MODEL.SOLO.INSTANCE_IN_CHANNELS", 32),
        ("MODEL.SOLO.INSTANCE_CHANNELS", 32),
        ("MODEL.SOLO.MASK_IN_CHANNELS", 32),
        ("MODEL.SOLO.MASK_CHANNELS", 32),
        ("MODEL.SOLO.NUM_MASKS", 32),
        ("MODEL.SOLO.NUM_KERNELS", 32),
    ],
}

# Mask models: every weight is rounded to a bfloat16 value (the reference runs in float32 with
# those values) and stored as bfloat16: exact, half the size.
BFLOAT16_WEIGHTS = {"adelaidet-meinst", "adelaidet-meinst-dcn", "adelaidet-solov2"}

CLASS_BIAS = -2.0  # replaces the focal prior bias (-4.6): some scores pass 0.05, not all
# mask models: smaller images (the fixture stays small)
IMAGE_SIZES = {"adelaidet-meinst": ((80, 96), (64, 80)), "adelaidet-meinst-dcn": ((80, 96), (64, 80))}
SOLOV2_CATE_BIAS = -2.8
MEINST_DCN_CLASS_BIAS = -3.31
# mask models: fewer detections (the fixture stores every mask at full image size)
CLASS_BIAS_MASKS = {"adelaidet-meinst": -3.28, "adelaidet-meinst-dcn": MEINST_DCN_CLASS_BIAS,
                    "adelaidet-solov2": SOLOV2_CATE_BIAS}
BOX_BIAS = 4.0  # box regression bias (distances ~4 strides): boxes leave the image, and NMS
# of clipped vs unclipped boxes differs on the fixture (96 vs 95 detections on image 0)

_STUBBED: List[str] = []


def stub_report() -> str:
    if not _STUBBED:
        return "nothing stubbed"
    return "; ".join(_STUBBED)


def _raising_module(name: str, why: str):
    m = types.ModuleType(name)

    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def unavailable(*a, **k):
            raise RuntimeError(f"{name}.{attr} is stubbed by dev/reference/reference_adelaidet.py ({why})")
        return unavailable
    m.__getattr__ = getattr_
    return m


def install_stubs(checkout: str):
    """Make ``import adet`` work on CPU without the compiled extension."""
    import importlib.util

    if "adet._C" not in sys.modules:
        try:
            with on_path(checkout):
                found = importlib.util.find_spec("adet._C") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            sys.modules["adet._C"] = _raising_module(
                "adet._C", "AdelaiDet's compiled ops (BezierAlign, DefROIAlign) do not build on "
                "this PyTorch; the FCOS/MEInst/SOLOv2/CondInst/BlendMask inference and training "
                "paths do not call them")
            _STUBBED.append("adet._C (BezierAlign, DefROIAlign: not on these models' paths)")
    if "skimage" not in sys.modules and importlib.util.find_spec("skimage") is None:
        sk = _raising_module("skimage", "BoxInst colour similarity only")
        sk.color = _raising_module("skimage.color", "BoxInst colour similarity only")
        sys.modules["skimage"] = sk
        sys.modules["skimage.color"] = sk.color
        _STUBBED.append("skimage.color (BoxInst's LAB similarity: not used with mask supervision)")


_PATCHED: List[str] = []


def install_cpu_deform_conv():
    """Detectron2's ``DeformConv`` (DCNv1, what AdelaiDet's DFConv2d builds by default) needs
    ``detectron2._C``, which this Detectron2 lacks, and then becomes a class that raises. It is
    replaced by an exact CPU equivalent: the same parameter (``weight``, no bias) and, in
    ``forward``, torchvision's ``deform_conv2d`` -- which is what Detectron2's own DeformConv
    calls on CPU. Only deformable_groups = groups = 1 (AdelaiDet's MEInst) is supported."""
    import math

    import detectron2.layers.deform_conv as d2dc
    from torch import nn
    from torch.nn.modules.utils import _pair
    from torchvision.ops import deform_conv2d

    if d2dc.DeformConv.__dict__.get("_d2seg_cpu", False):
        return

    class DeformConv(nn.Module):
        _d2seg_cpu = True

        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                     groups=1, deformable_groups=1, bias=False, norm=None, activation=None):
            super().__init__()
            if bias or groups != 1 or deformable_groups != 1:
                raise NotImplementedError("CPU DeformConv stand-in: bias=False, groups=1, deformable_groups=1")
            self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
            self.norm, self.activation = norm, activation
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *_pair(kernel_size)))
            self.bias = None
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

        def forward(self, x, offset):
            x = deform_conv2d(x, offset, self.weight, stride=self.stride, padding=self.padding,
                              dilation=self.dilation)
            if self.norm is not None:
                x = self.norm(x)
            if self.activation is not None:
                x = self.activation(x)
            return x

    d2dc.DeformConv = DeformConv
    _PATCHED.append("detectron2.layers.deform_conv.DeformConv (needs detectron2._C) replaced by an exact "
                    "CPU equivalent: torchvision.ops.deform_conv2d, as Detectron2's DeformConv runs on CPU")


def patch_meinst_layout():
    """AdelaiDet's MEInstOutputs.forward_for_single_feature_map calls ``.view(N, -1)`` on a
    permuted tensor, which current PyTorch refuses (the sigmoid keeps the permuted strides).
    The patch hands it the classification logits in channels-last memory layout, so that the
    permuted tensor is contiguous: a layout change only, every value is the same."""
    from adet.modeling.MEInst.MEInst_outputs import MEInstOutputs

    orig = MEInstOutputs.forward_for_single_feature_map
    if getattr(orig, "_d2seg_patched", False):
        return

    def patched(self, locations, box_cls, *args, **kwargs):
        return orig(self, locations, box_cls.contiguous(memory_format=torch.channels_last), *args, **kwargs)
    patched._d2seg_patched = True
    MEInstOutputs.forward_for_single_feature_map = patched
    _PATCHED.append("MEInstOutputs.forward_for_single_feature_map gets channels-last logits "
                    "(its .view on a permuted tensor fails on current PyTorch; values unchanged)")


def patch_meinst_iou_loss(gen):
    """At AdelaiDet's HEAD, MEInst calls ``IOULoss(pred, target, weight)`` but IOULoss takes
    ``(ious, gious, weight)`` since FCOS moved the IoU computation into ``compute_ious``: MEInst's
    training fails. The patch wraps the module: AdelaiDet's own ``compute_ious`` (as FCOS calls
    it, IoU smoothed by +1), then its IOULoss."""
    from adet.utils.comm import compute_ious
    from torch import nn

    class _IoULossOnBoxes(nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, pred, target, weight=None):
            ious, gious = compute_ious(pred, target)
            return self.loss(ious, gious, weight)

    gen.iou_loss = _IoULossOnBoxes(gen.iou_loss)
    _PATCHED.append("MEInst's iou_loss takes boxes: AdelaiDet's compute_ious then its IOULoss "
                    "(MEInst at HEAD passes boxes to IOULoss, which takes IoUs since FCOS's change)")


def _opts(name: str, reference: bool = False):
    """The width overrides as [KEY, VALUE, ...], d2seg's key names (``reference``: AdelaiDet's)."""
    out = []
    for k, v in NARROW_FOR.get(name, NARROW):
        if reference and k.startswith("MODEL.SOLO."):
            k = "MODEL.SOLOV2." + k[len("MODEL.SOLO."):]
        out += [k, v]
    return out


def _build(name: str, checkout: str, seed: int, extra_opts=()):
    from adet.config import get_cfg
    from detectron2.modeling import build_model
    import adet.modeling  # noqa: F401  registers the meta-architectures

    cfg = get_cfg()
    cfg.merge_from_file(f"{checkout}/{REFERENCE_CONFIG[name]}")
    cfg.merge_from_list(_opts(name, reference=True))
    cfg.merge_from_list(list(extra_opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    seed_all(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith(("cls_logits.bias", "cate_pred.bias")):
                p.fill_(CLASS_BIAS_MASKS.get(name, CLASS_BIAS))
            elif k.endswith("bbox_pred.bias"):
                p.fill_(BOX_BIAS)
            elif k.endswith(".bias") and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif k.endswith("scales.0.scale") or ".scale" in k and p.numel() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for k, b in model.named_buffers():
            # FrozenBN statistics and affine: keep activations of order 1 through the ResNet
            if k.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)
            elif k.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif k.startswith("backbone") and k.endswith(".weight"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.3 + 0.2)
            elif k.startswith("backbone") and k.endswith(".bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        if name in BFLOAT16_WEIGHTS:
            for t in model.state_dict().values():  # not pixel_mean/std (not saved)
                if t.is_floating_point():
                    t.copy_(t.to(torch.bfloat16).float())
    return cfg, model


def _random_meinst_encoding(seed: int, dim: int, size: int):
    """A random class-agnostic encoding: orthonormal components, positive variances, means of
    logit-space masks (what AdelaiDet's PCA file holds)."""
    g = torch.Generator().manual_seed(seed + 2)
    q, _ = torch.linalg.qr(torch.randn(size * size, dim, generator=g, dtype=torch.float64))
    comps = q.T.contiguous()
    var = torch.sort(torch.rand(dim, generator=g, dtype=torch.float64) * 20 + 0.5, descending=True)[0]
    mean = torch.randn(size * size, generator=g, dtype=torch.float64) * 1.5
    # bfloat16 values (see BFLOAT16_WEIGHTS): the file and the state dict hold the same numbers
    return tuple(t.to(torch.bfloat16).double() for t in (comps, var, mean))


def _one_stage_run(name: str, cfg, model, head, inputs, head_names, train_context=None):
    """Head outputs (forward hook on ``head``: output i is stored as ``head_names[i]``),
    results (eval) and losses (train, inside ``train_context`` if given)."""
    import contextlib

    from detectron2.utils.events import EventStorage

    head_out = {}

    def hook(mod, args, out):
        for i, key in head_names.items():
            head_out[key] = [t.detach().clone() for t in out[i]]

    h = head.register_forward_hook(hook)
    model.eval()
    with torch.no_grad():
        results = model(to_detectron2_inputs(inputs))
    h.remove()
    results = [instances_to_dict(r["instances"]) for r in results]
    model.train()
    with EventStorage(), (train_context or contextlib.nullcontext()):
        losses = model(to_detectron2_inputs(inputs))
    losses = {k: v.detach() for k, v in losses.items()}
    return head_out, results, losses


def _fixture_dict(name: str, seed: int, model, inputs, head_out, results, losses, notes: str):
    return {
        "repo": "aim-uofa/AdelaiDet",
        "reference_config": REFERENCE_CONFIG[name],
        "d2seg_config": D2SEG_CONFIG[name],
        "d2seg_opts": _opts(name),
        "seed": seed,
        "notes": ("stubbed: " + stub_report() + ". Patched: " + ("; ".join(_PATCHED) or "nothing")
                  + ". " + notes),
        "weights": {k: (v.detach().to(torch.bfloat16) if name in BFLOAT16_WEIGHTS and v.is_floating_point()
                        else v.detach().clone()) for k, v in model.state_dict().items()},
        "inputs": inputs,
        "outputs": {"head": head_out, "results": results},
        "losses": losses,
    }


FCOS_HEAD_NAMES = {0: "logits", 1: "bbox_reg", 2: "ctrness"}


def _fcos_fixture(name: str, checkout: str, seed: int) -> Dict:
    cfg, model = _build(name, checkout, seed)
    inputs = synthetic_images(seed)
    head_out, results, losses = _one_stage_run(name, cfg, model, model.proposal_generator.fcos_head,
                                               inputs, FCOS_HEAD_NAMES)
    return _fixture_dict(name, seed, model, inputs, head_out, results, losses,
                         "Head outputs: the FCOS head's per-level logits, bbox_reg (distances / "
                         "stride, after ReLU) and ctrness.")


# MEInst's training targets: AdelaiDet clamps each binary target pixel to [v, 1 - v] before the
# logit, v = max(0.05 * torch.rand_like(.), 0.01), drawn anew at every step. The fixture
# controls that draw: u = (k + 0.5) / RAND_LEVELS with k uint8 from the seed, stored.
RAND_LEVELS = 256


class _RecordedRandLike:
    """Replaces ``torch.rand_like`` for one training step of AdelaiDet's MEInst (its only
    caller on that path is PCAMaskEncoding.inverse_sigmoid): seeded values on a grid of
    RAND_LEVELS levels (exactly representable), recorded as uint8."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.draws = []

    def __call__(self, x, *args, **kwargs):
        k = torch.randint(0, RAND_LEVELS, x.shape, generator=self.g, dtype=torch.int64)
        self.draws.append(k.to(torch.uint8))
        return ((k.double() + 0.5) / RAND_LEVELS).to(dtype=x.dtype, device=x.device)

    def __enter__(self):
        self._orig = torch.rand_like
        torch.rand_like = self
        return self

    def __exit__(self, *exc):
        torch.rand_like = self._orig


def _positives_order(labels_level_first, num_images: int, num_classes: int) -> torch.Tensor:
    """AdelaiDet's order of the positives (level, image, location in the level) -> the
    permutation to d2seg's order (image, location over all levels)."""
    keys, offset = [], 0
    for lab in labels_level_first:
        lab = lab.reshape(num_images, -1)
        im, loc = (lab != num_classes).nonzero(as_tuple=True)
        keys.append(im * 10**9 + offset + loc)
        offset += lab.shape[1]
    return torch.argsort(torch.cat(keys))


def _meinst_fixture(name: str, checkout: str, seed: int) -> Dict:
    import os
    import shutil
    import tempfile

    import numpy as np
    from adet.modeling.MEInst.MEInst_outputs import MEInstOutputs

    # AdelaiDet reads its PCA file (PATH_COMPONENTS) at the first training step and keeps the
    # values in proposal_generator.mask_encoding.*; here a random encoding, written to a
    # temporary file for training and set in the state dict for inference.
    comps, var, mean = _random_meinst_encoding(seed, 60, 28)
    if name == "adelaidet-meinst-dcn":
        install_cpu_deform_conv()
    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "encoding.npz")
        np.savez(path, components_c=comps[None].numpy(), explained_variance_c=var[None].numpy(),
                 mean_c=mean[None].numpy())
        cfg, model = _build(name, checkout, seed, ["MODEL.MEInst.PATH_COMPONENTS", path])
        gen = model.proposal_generator
        with torch.no_grad():
            gen.mask_encoding.components.copy_(comps.float())
            gen.mask_encoding.explained_variances.copy_(var.float())
            gen.mask_encoding.means.copy_(mean.float())
        patch_meinst_layout()
        patch_meinst_iou_loss(gen)

        seen = {}
        orig_gt = MEInstOutputs._get_ground_truth

        def get_ground_truth(self):
            out = orig_gt(self)
            seen["labels"] = [t.clone() for t in out["labels"]]
            seen["num_images"] = len(self.gt_instances)
            return out

        MEInstOutputs._get_ground_truth = get_ground_truth
        rand = _RecordedRandLike(seed + 3)
        inputs = synthetic_images(seed, sizes=IMAGE_SIZES[name])
        try:
            head_out, results, losses = _one_stage_run(
                name, cfg, model, gen.MEInst_head, inputs,
                {0: "logits", 1: "bbox_reg", 2: "ctrness", 4: "mask_reg"}, rand)
        finally:
            MEInstOutputs._get_ground_truth = orig_gt
    finally:
        shutil.rmtree(tmp)
    if len(rand.draws) != 1:
        raise RuntimeError(f"expected one torch.rand_like call in MEInst's training step, got {len(rand.draws)}")
    draws = rand.draws[0]
    order = _positives_order(seen["labels"], seen["num_images"], cfg.MODEL.MEInst.NUM_CLASSES)
    if len(order) != draws.shape[0]:
        raise RuntimeError(f"{len(order)} positives but {draws.shape[0]} rows of random draws")
    out = _fixture_dict(
        name, seed, model, inputs, head_out, results, losses,
        "Head outputs: the MEInst head's per-level logits, bbox_reg (distances / stride, after "
        "ReLU), ctrness and mask_reg (the mask branch's coefficients). A random encoding is in "
        "the state dict (proposal_generator.mask_encoding.*) and, for training, in the "
        "PATH_COMPONENTS file. Weights: bfloat16 values, stored as bfloat16 (the reference ran "
        "in float32 with the same values). Training: torch.rand_like (AdelaiDet's random clamp of the "
        "logit-space targets, PCAMaskEncoding.inverse_sigmoid) returns (k + 0.5) / "
        f"{RAND_LEVELS}, k in train_extra['clamp_rand'] (uint8, positives x m*m, rows in "
        "d2seg's order of positives: image, then location over all levels).")
    out["train_extra"] = {"clamp_rand": draws[order].contiguous(), "rand_levels": RAND_LEVELS,
                          "value_max": 0.05, "value_min": 0.01}
    return out


# SOLOv2: hand-made ground truth on two 64 x 96 / 64 x 80 images (padded batch 64 x 96), so
# that each convention of the grid assignment shows in the losses:
#   image 0, A: rectangle x [4, 50), y [6, 58) (sqrt(area) 48.9: levels 0 and 1). Its centre
#       of mass is y = 32 with pixel centres at i + 0.5, 31.5 with AdelaiDet's pixel indices:
#       32 lies on a cell boundary of both levels (64 / 40 * 20, 64 / 36 * 18).
#   image 1, F (first) inside E (second): their centre regions share cells on level 0; a
#       shared cell goes to the smaller one (d2seg) or to the later one (AdelaiDet).
#   edges off the 4-pixel grid everywhere: the stride-4 mask targets differ between area
#       averaging and AdelaiDet's bilinear resize.
SOLOV2_SIZES = ((64, 96), (64, 80))
SOLOV2_OBJECTS = (
    # (image, kind, x0, y0, x1, y1, class, depth): rectangles [x0, x1) x [y0, y1), ellipses in
    # that box; an object hides the parts of those with a smaller depth
    (0, "rect", 4, 6, 50, 58, 3, 0),
    (0, "ellipse", 59, 11, 81, 29, 17, 1),
    (0, "rect", 62, 40, 89, 61, 52, 2),
    (1, "ellipse", 21, 20, 31, 31, 7, 1),
    (1, "rect", 7, 9, 41, 42, 61, 0),
    (1, "ellipse", 50, 35, 69, 50, 29, 2),
)
# SOLOv2's head outputs are too large to store whole (80 x 4176 category logits per image):
# stored are the first HEAD_CHANNELS channels of every cell and HEAD_PROJECTIONS random
# projections over all channels (the test projects d2seg's outputs with the same vectors).
HEAD_CHANNELS = 4
HEAD_PROJECTIONS = 2


def _solov2_inputs(seed: int) -> List[Dict]:
    import numpy as np

    rng = np.random.RandomState(seed)
    out = []
    for n, (h, w) in enumerate(SOLOV2_SIZES):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([60 + 40 * np.sin(xx / 7 + c) + 30 * np.cos(yy / 11 - c) for c in range(3)])
        img += rng.uniform(-10, 10, size=img.shape)
        objs = [o for o in SOLOV2_OBJECTS if o[0] == n]
        masks, labels = [], []
        for (_, kind, x0, y0, x1, y1, cls, _) in objs:
            if kind == "rect":
                m = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
            else:
                cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
                m = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
            masks.append(m)
            labels.append(cls)
        visible = []
        for k, m in enumerate(masks):
            for j, other in enumerate(masks):
                if objs[j][7] > objs[k][7]:
                    m = m & ~other
            visible.append(m)
        masks = visible
        for k in sorted(range(len(objs)), key=lambda k: objs[k][7]):
            m = masks[k]
            img[:, m] = rng.uniform(0, 255, size=(3, 1)) + rng.uniform(-8, 8, size=(3, int(m.sum())))
        masks = np.stack(masks)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        out.append({
            "image": torch.from_numpy(np.clip(img, 0, 255).round().astype(np.uint8)),
            "height": h, "width": w,
            "instances": {"gt_boxes": torch.tensor(boxes, dtype=torch.float32),
                          "gt_classes": torch.tensor(labels, dtype=torch.int64),
                          "gt_masks": torch.from_numpy(masks)},
        })
    return out


def head_summary(maps: List[torch.Tensor], projections: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
    """Per level (N, C, S, S) -> {"channels": (N, HEAD_CHANNELS, S, S), "projections":
    (N, HEAD_PROJECTIONS, S, S) = sum_c projections[k, c] * x[:, c]} (float64 sums)."""
    return {"channels": [m[:, :HEAD_CHANNELS].detach().clone() for m in maps],
            "projections": [torch.einsum("nchw,kc->nkhw", m.detach().double(), projections.double())
                            for m in maps]}


def _solov2_fixture(name: str, checkout: str, seed: int) -> Dict:
    from detectron2.utils.events import EventStorage

    cfg, model = _build(name, checkout, seed)
    inputs = _solov2_inputs(seed)
    g = torch.Generator().manual_seed(seed + 4)
    proj_cate = torch.randn(HEAD_PROJECTIONS, cfg.MODEL.SOLOV2.NUM_CLASSES, generator=g)
    proj_kernel = torch.randn(HEAD_PROJECTIONS, cfg.MODEL.SOLOV2.NUM_KERNELS, generator=g)
    seen = {}
    h1 = model.ins_head.register_forward_hook(lambda m, a, out: seen.update(ins=out))
    h2 = model.mask_head.register_forward_hook(lambda m, a, out: seen.update(mask=out))
    model.eval()
    with torch.no_grad():
        results = model(to_detectron2_inputs(inputs))
    h1.remove()
    h2.remove()
    cate, kernel = seen["ins"]
    head_out = {"cate_pred": head_summary(cate, proj_cate), "kernel_pred": head_summary(kernel, proj_kernel),
                "mask_feat": seen["mask"].detach().clone(),
                "proj_cate": proj_cate, "proj_kernel": proj_kernel}
    results = [instances_to_dict(r["instances"]) for r in results]
    for r in results:
        r.pop("pred_boxes", None)  # AdelaiDet's SOLOv2 returns zero boxes
    model.train()
    with EventStorage():
        losses = model(to_detectron2_inputs(inputs))
    losses = {k: v.detach() for k, v in losses.items()}
    return _fixture_dict(
        name, seed, model, inputs, head_out, results, losses,
        "Weights: bfloat16 values, stored as bfloat16 (the reference ran in float32 with the same "
        "values). Head outputs, per level: cate_pred (category logits) and kernel_pred (dynamic "
        f"kernels), each as its first {HEAD_CHANNELS} channels and {HEAD_PROJECTIONS} random "
        "projections over all channels (vectors proj_cate, proj_kernel); mask_feat, the unified "
        "mask feature. Results without boxes (AdelaiDet returns zeros). Ground truth hand-made "
        "(SOLOV2_OBJECTS): a centre of mass on a cell boundary, two instances sharing cells, "
        "edges off the 4-pixel grid.")


BUILDERS = {
    "adelaidet-fcos": _fcos_fixture,
    "adelaidet-meinst": _meinst_fixture,
    "adelaidet-meinst-dcn": _meinst_fixture,
    "adelaidet-solov2": _solov2_fixture,
}


def build_fixture(name: str, checkout: str, seed: int) -> Dict:
    install_stubs(checkout)
    with on_path(checkout):
        return BUILDERS[name](name, checkout, seed)
