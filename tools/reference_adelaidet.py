"""Fixture builders for aim-uofa/AdelaiDet (see tools/reference_fixtures.py).

    python tools/reference_fixtures.py --reference adelaidet-fcos --checkout /path/to/AdelaiDet

AdelaiDet on CPU without its compiled part. ``adet._C`` (BezierAlign, DefROIAlign: CUDA/C++
sources that do not build against PyTorch 2.14) is replaced before import by a stub module
whose functions raise; none of the references built here calls them (they serve ABCNet and
the deformable RoI align of other methods). ``skimage`` (imported by CondInst for BoxInst's
LAB colour similarity, unused with full mask supervision) is stubbed the same way when it is
not installed. :func:`stub_report` says what was stubbed; the fixture's "notes" record it.
No CUDA-only op lies on the FCOS path, so nothing is replaced by a CPU equivalent.

Each model is built from AdelaiDet's own config of the published checkpoint, narrowed by
:data:`NARROW` (the same keys narrow d2seg's shipped config: the test applies them and
nothing else), with random weights from the seed (FrozenBN statistics randomised, the
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
}

REFERENCE_CONFIG = {
    "adelaidet-fcos": "configs/FCOS-Detection/R_50_1x.yaml",
}

D2SEG_CONFIG = {
    "adelaidet-fcos": "configs/FCOS/R_50_1x.yaml",
}

# Width overrides valid for both AdelaiDet's and d2seg's configs (R-50 layout, narrow).
NARROW = [
    ("MODEL.RESNETS.STEM_OUT_CHANNELS", 16),
    ("MODEL.RESNETS.RES2_OUT_CHANNELS", 16),
    ("MODEL.RESNETS.WIDTH_PER_GROUP", 4),
    ("MODEL.FPN.OUT_CHANNELS", 32),
]

CLASS_BIAS = -2.0  # replaces the focal prior bias (-4.6): some scores pass 0.05, not all
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
            raise RuntimeError(f"{name}.{attr} is stubbed by tools/reference_adelaidet.py ({why})")
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
    if importlib.util.find_spec("skimage") is None and "skimage" not in sys.modules:
        sk = _raising_module("skimage", "BoxInst colour similarity only")
        sk.color = _raising_module("skimage.color", "BoxInst colour similarity only")
        sys.modules["skimage"] = sk
        sys.modules["skimage.color"] = sk.color
        _STUBBED.append("skimage.color (BoxInst's LAB similarity: not used with mask supervision)")


def _opts():
    out = []
    for k, v in NARROW:
        out += [k, v]
    return out


def _build(name: str, checkout: str, seed: int):
    from adet.config import get_cfg
    from detectron2.modeling import build_model
    import adet.modeling  # noqa: F401  registers the meta-architectures

    cfg = get_cfg()
    cfg.merge_from_file(f"{checkout}/{REFERENCE_CONFIG[name]}")
    cfg.merge_from_list(_opts())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    seed_all(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("cls_logits.bias"):
                p.fill_(CLASS_BIAS)
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
    return cfg, model


def _fcos_fixture(name: str, checkout: str, seed: int) -> Dict:
    from detectron2.utils.events import EventStorage

    cfg, model = _build(name, checkout, seed)
    inputs = synthetic_images(seed)
    head_out = {}

    def hook(mod, args, out):
        logits, bbox_reg, ctrness = out[0], out[1], out[2]
        head_out["logits"] = [t.detach().clone() for t in logits]
        head_out["bbox_reg"] = [t.detach().clone() for t in bbox_reg]
        head_out["ctrness"] = [t.detach().clone() for t in ctrness]

    h = model.proposal_generator.fcos_head.register_forward_hook(hook)
    model.eval()
    with torch.no_grad():
        results = model(to_detectron2_inputs(inputs))
    h.remove()
    results = [instances_to_dict(r["instances"]) for r in results]
    model.train()
    with EventStorage():
        losses = model(to_detectron2_inputs(inputs))
    losses = {k: v.detach() for k, v in losses.items()}
    return {
        "repo": "aim-uofa/AdelaiDet",
        "reference_config": REFERENCE_CONFIG[name],
        "d2seg_config": D2SEG_CONFIG[name],
        "d2seg_opts": _opts(),
        "seed": seed,
        "notes": ("stubbed: " + stub_report() + ". Head outputs: the FCOS head's per-level "
                  "logits, bbox_reg (distances / stride, after ReLU) and ctrness."),
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "inputs": inputs,
        "outputs": {"head": head_out, "results": results},
        "losses": losses,
    }


BUILDERS = {
    "adelaidet-fcos": _fcos_fixture,
}


def build_fixture(name: str, checkout: str, seed: int) -> Dict:
    install_stubs(checkout)
    with on_path(checkout):
        return BUILDERS[name](name, checkout, seed)
