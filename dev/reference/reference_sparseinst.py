"""Fixture builder for hustvl/SparseInst (see dev/reference/reference_fixtures.py).

Builds hustvl's SparseInst from its own ``configs/sparse_inst_r50_giam.yaml`` (R-50,
instance context encoder, Group-IAM decoder) narrowed by :data:`NARROW`, with random
weights from the seed (:func:`build_reference_model`: the class bias raised by
:data:`CLASS_BIAS`), then spreads the queries' objectness so that the 0.005 score threshold
falls among them (:func:`spread_objectness`: some queries of each image are cut, the others
kept, so the threshold path is compared too), and records on the fixture images: the
decoder's outputs (eval mode), the final results, how many queries the threshold cut, and
the training losses (train mode, same weights, same batch). Nothing of the reference is
patched; timm is stubbed when it is not installed (:func:`_stub_timm`).
"""
from typing import Dict

import torch

from reference_fixtures import on_path, seed_all, synthetic_images, to_detectron2_inputs, instances_to_dict

REFERENCES = {"sparseinst": "hustvl/SparseInst R-50 G-IAM (configs/sparse_inst_r50_giam.yaml)"}

# The same keys narrow both sides: (key, value) pairs valid for hustvl's and d2seg's configs.
NARROW = [
    ("MODEL.RESNETS.STEM_OUT_CHANNELS", 16),
    ("MODEL.RESNETS.RES2_OUT_CHANNELS", 16),
    ("MODEL.RESNETS.WIDTH_PER_GROUP", 4),
    ("MODEL.SPARSE_INST.ENCODER.NUM_CHANNELS", 32),
    ("MODEL.SPARSE_INST.DECODER.INST.DIM", 24),
    ("MODEL.SPARSE_INST.DECODER.MASK.DIM", 24),
    ("MODEL.SPARSE_INST.DECODER.KERNEL_DIM", 16),
    ("MODEL.SPARSE_INST.DECODER.NUM_MASKS", 12),
]


CLASS_BIAS = 1.0  # added to the focal prior bias (-4.6): the best class's probability about 0.08

# The fixture's objectness (spread_objectness): weights at this gain / sqrt(fan_in), so that the
# 12 queries' objectness logits spread over about 3 (at build_reference_model's gain 2, over
# 0.1), and this bias, which puts the 0.005 score threshold sqrt(p_class * p_objectness) among
# them (chosen by scanning the bias in steps of 0.1 on the fixture images, seed 0: 6 of the 12
# queries of each image are cut, and every score is at least 12 % away from the threshold).
OBJECTNESS_GAIN = 40.0
OBJECTNESS_BIAS = -5.7
SCORE_THRESHOLD = 0.005  # configs/sparse_inst_r50_giam.yaml (MODEL.SPARSE_INST.CLS_THRESHOLD)


def _opts():
    out = []
    for k, v in NARROW:
        out += [k, v]
    return out


def _stub_timm():
    """hustvl's package imports timm for backbones the R-50 config does not use (ResNet-vd,
    PVT, CSPNet); when timm is absent, a stub module whose names are placeholder classes."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("timm") is not None:
        return False

    class _Unused:
        def __init__(self, *a, **k):
            raise RuntimeError("timm stub: this backbone needs timm")

    def stub(name):
        m = types.ModuleType(name)
        def getattr_(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Unused
        m.__getattr__ = getattr_
        return m

    for name in ("timm", "timm.models", "timm.models.layers", "timm.models.resnet"):
        sys.modules.setdefault(name, stub(name))
    return True


def build_reference_model(checkout: str, seed: int, opts=None):
    """hustvl's model from its R-50 G-IAM config plus ``opts`` ([KEY, VALUE, ...]; default the
    narrowing of the fixtures, ``[]`` for the published widths), random weights from the seed
    (randomised as the module doc says). Call inside ``on_path(checkout)``. -> (cfg, model)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from sparseinst import add_sparse_inst_config

    cfg = get_cfg()
    add_sparse_inst_config(cfg)
    cfg.merge_from_file(f"{checkout}/configs/sparse_inst_r50_giam.yaml")
    cfg.merge_from_list(_opts() if opts is None else list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""

    seed_all(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # random (not zero) weights everywhere the init left constants, and biases that make
        # predictions confident enough to pass the thresholds
        for k, p in model.named_parameters():
            if k.endswith(".bias") and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for k, b in model.named_buffers():
            # FrozenBN statistics and affine: keep activations of order 1 through the ResNet
            if k.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)
            elif k.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif k.startswith("backbone") and k.endswith(".weight"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.3 + 0.2)
            elif k.startswith("backbone") and k.endswith(".bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        # the prediction layers start near zero (std 0.01): every instance would be the same
        ib = model.decoder.inst_branch
        for layer, gain in ((ib.iam_conv, 3.0), (ib.cls_score, 2.0), (ib.mask_kernel, 6.0),
                            (ib.objectness, 2.0)):
            fan_in = layer.weight[0].numel()
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * gain / fan_in ** 0.5)
        ib.mask_kernel.bias.copy_(torch.randn(ib.mask_kernel.bias.shape, generator=g))
        model.decoder.inst_branch.cls_score.bias.add_(CLASS_BIAS)
    return cfg, model


def spread_objectness(model, seed: int, gain: float = OBJECTNESS_GAIN, bias: float = OBJECTNESS_BIAS):
    """Objectness weights redrawn at ``gain`` / sqrt(fan_in) (generator seed + 2) and the bias
    set to ``bias``: the queries' scores then straddle the score threshold."""
    layer = model.decoder.inst_branch.objectness
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        fan_in = layer.weight[0].numel()
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * gain / fan_in ** 0.5)
        layer.bias.fill_(bias)


def build_fixture(name: str, checkout: str, seed: int) -> Dict:
    stubbed = _stub_timm()
    with on_path(checkout):
        cfg, model = build_reference_model(checkout, seed)
        spread_objectness(model, seed)
        if cfg.MODEL.SPARSE_INST.CLS_THRESHOLD != SCORE_THRESHOLD:
            raise RuntimeError(f"{checkout}: CLS_THRESHOLD {cfg.MODEL.SPARSE_INST.CLS_THRESHOLD}, "
                               f"the fixture was designed for {SCORE_THRESHOLD}")

        inputs = synthetic_images(seed, num_classes=cfg.MODEL.SPARSE_INST.DECODER.NUM_CLASSES)
        # images are RGB (INPUT.FORMAT "RGB"); synthetic_images' channel order is arbitrary

        head = {}

        def hook(_m, _i, out):
            head.update({k: v.detach().clone() for k, v in out.items() if torch.is_tensor(v)})

        h = model.decoder.register_forward_hook(hook)
        model.eval()
        with torch.no_grad():
            results = model(to_detectron2_inputs(inputs))
        h.remove()
        results = [instances_to_dict(r["instances"]) for r in results]
        # the reference's own score (sqrt(p_class * p_objectness), best class) per query
        scores = torch.sqrt(head["pred_logits"].sigmoid() * head["pred_scores"].sigmoid()).max(-1).values
        cut = [int(n) for n in (scores <= SCORE_THRESHOLD).sum(-1)]
        kept = [len(r["scores"]) for r in results]
        if any(c == 0 or k == 0 for c, k in zip(cut, kept)):
            raise RuntimeError(f"queries cut per image {cut}, kept {kept}: every image needs both; "
                               "rescan OBJECTNESS_BIAS")

        model.train()
        losses = model(to_detectron2_inputs(inputs))
        losses = {k: v.detach() for k, v in losses.items()}

    return {
        "repo": "hustvl/SparseInst",
        "reference_config": "configs/sparse_inst_r50_giam.yaml",
        "d2seg_config": "configs/SparseInst/sparse_inst_r50_giam.yaml",
        "d2seg_opts": _opts(),
        "seed": seed,
        "notes": ("timm stubbed (only imported by unused backbones); " if stubbed else "")
                 + "nothing patched; random init from the seed, zero biases and FrozenBN "
                 f"statistics randomised, class bias +{CLASS_BIAS:g}, objectness weights at gain "
                 f"{OBJECTNESS_GAIN:g} / sqrt(fan_in) and bias {OBJECTNESS_BIAS:g}, so that the "
                 f"{SCORE_THRESHOLD:g} score threshold cuts {cut} of the {scores.shape[1]} queries "
                 "of the images and keeps the others",
        "threshold": {"score": SCORE_THRESHOLD, "cut": cut},
        "weights": {k: v for k, v in model.state_dict().items()},
        "inputs": inputs,
        "outputs": {"head": head, "results": results},
        "losses": losses,
    }
