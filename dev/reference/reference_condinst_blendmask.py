"""Fixture builders for AdelaiDet's CondInst and BlendMask (see dev/reference/reference_fixtures.py).

    GIT_DIR=<mirror>/repo python dev/reference/reference_fixtures.py --reference condinst \\
        --checkout /path/to/AdelaiDet --out tests/data/reference/
    ... --reference blendmask ...

(``GIT_DIR`` only when the checkout has no ``.git``: it names the git directory that records
its commit.) AdelaiDet runs on CPU with its compiled part stubbed exactly as for FCOS
(``install_stubs`` of dev/reference/reference_adelaidet.py: ``adet._C`` and, for CondInst's BoxInst
colour similarity, ``skimage``). Neither model calls a compiled op on its CPU path: CondInst's
dynamic head is grouped ``F.conv2d``, and BlendMask's blender crops the bases with Detectron2's
``ROIPooler`` (``ROIAlignV2`` = torchvision's ``roi_align`` with ``aligned=True``, which runs on
CPU), so nothing is replaced by a CPU equivalent.

Each model is AdelaiDet's config of its published checkpoint (CondInst ``MS_R_50_1x``,
BlendMask ``R_50_1x``), narrowed by :data:`NARROW` (keys valid in both AdelaiDet's and d2seg's
configs), with random weights from the seed: FrozenBN statistics randomised, BatchNorm running
statistics randomised, zero biases made random, the classification prior raised so that a
few detections pass, the box bias raised so that boxes leave the image, and the per-instance
heads (CondInst's controller, BlendMask's attention layer) scaled up so that masks vary inside
each box. Every floating-point weight is rounded to float16 before anything runs and stored
in float16 (exact: the values are float16 numbers), which halves the fixture.

Recorded on the fixture images: head outputs and final results in eval mode, then the training
losses in train mode (same weights: the BatchNorm statistics the training pass updates are
restored first), and the extra runs described under ``train_extra`` in each builder.
"""
import copy
from typing import Dict, List

import torch

from reference_fixtures import instances_to_dict, on_path, seed_all, synthetic_images, to_detectron2_inputs
from reference_adelaidet import BOX_BIAS, NARROW, install_stubs, stub_report

REFERENCES = {
    "condinst": "AdelaiDet CondInst MS_R_50_1x (configs/CondInst/MS_R_50_1x.yaml)",
    "blendmask": "AdelaiDet BlendMask R_50_1x (configs/BlendMask/R_50_1x.yaml)",
}

FIXTURE_FILE = {"condinst": "adelaidet_condinst.pt", "blendmask": "adelaidet_blendmask.pt"}

REFERENCE_CONFIG = {
    "condinst": "configs/CondInst/MS_R_50_1x.yaml",
    "condinst-sem": "configs/CondInst/MS_R_50_3x_sem.yaml",
    "blendmask": "configs/BlendMask/R_50_1x.yaml",
}

D2SEG_CONFIG = {
    "condinst": "configs/CondInst/R_50_1x.yaml",
    "condinst-sem": "configs/CondInst/R_50_3x_sem.yaml",
    "blendmask": "configs/BlendMask/R_50_1x.yaml",
}

# Width overrides on top of FCOS's (same key names in AdelaiDet and d2seg).
NARROW_MASK = {
    "condinst": [("MODEL.CONDINST.MASK_BRANCH.CHANNELS", 16)],
    "blendmask": [("MODEL.BASIS_MODULE.CONVS_DIM", 16)],
}

# AdelaiDet's CondInst concatenates the detections of the batch into one Instances, which
# needs equal image sizes.
IMAGE_SIZES = {"condinst": ((80, 96), (80, 96)), "blendmask": ((64, 80), (72, 64))}
# a few detections per image at the 0.05 threshold on cls x ctr (the fixture stores every mask)
CLASS_BIAS = {"condinst": -2.62, "blendmask": -2.67}
# std of the per-instance head's weights (AdelaiDet initialises them with 0.01, which gives
# nearly flat masks with random features)
TOP_WEIGHT_STD = {"condinst": 0.03, "blendmask": 0.05}
# BlendMask: the 1x1 conv to the bases scaled up (bases of a few units: masks vary in a box)
BASES_WEIGHT, BASES_GAIN = "basis_module.tower.5.weight", 10.0
# CondInst training with MAX_PROPOSALS below the number of positives (a random subset)
MAX_SAMPLED = 16
# CondInst training with TOPK_PROPOSALS_PER_IM instead of MAX_PROPOSALS (AdelaiDet allows only
# one of the two): the per-ground-truth split of this quota.
TOPK = 8


def _opts(name: str) -> List:
    out = []
    for k, v in list(NARROW) + NARROW_MASK[name]:
        out += [k, v]
    return out


def _randomise(model, name: str, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    top = {"condinst": "controller.weight", "blendmask": "top_layer.weight"}[name]
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("cls_logits.bias"):
                p.fill_(CLASS_BIAS[name])
            elif k.endswith("bbox_pred.bias"):
                p.fill_(BOX_BIAS)
            elif k == top:
                p.copy_(torch.randn(p.shape, generator=g) * TOP_WEIGHT_STD[name])
            elif k == BASES_WEIGHT and name == "blendmask":
                p.mul_(BASES_GAIN)
            elif k.endswith(".bias") and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif ".scale" in k and p.numel() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for k, b in model.named_buffers():
            if k.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)
            elif k.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif k.startswith("backbone") and k.endswith(".weight"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.3 + 0.2)
            elif k.startswith("backbone") and k.endswith(".bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        # float16 numbers, stored exactly in float16 (see the module doc)
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.float32:
                t.copy_(t.half().float())


def _build(name: str, checkout: str, seed: int, extra_opts=()):
    from adet.config import get_cfg
    from detectron2.modeling import build_model
    import adet.modeling  # noqa: F401  registers the meta-architectures

    cfg = get_cfg()
    cfg.merge_from_file(f"{checkout}/{REFERENCE_CONFIG[name]}")
    cfg.merge_from_list(_opts(name.split("-")[0]))
    cfg.merge_from_list(list(extra_opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    seed_all(seed)
    return cfg, build_model(cfg)


def _state(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _half_weights(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if v.dtype == torch.float32:
            h = v.half()
            assert torch.equal(h.float(), v), k
            v = h
        out[k] = v
    return out


def _train_losses(model, state, inputs, extra=None):
    from detectron2.utils.events import EventStorage

    model.load_state_dict(state)
    model.train()
    batch = to_detectron2_inputs(inputs)
    if extra:
        for x, e in zip(batch, extra):
            x.update(e)
    with EventStorage():
        losses = model(batch)
    model.load_state_dict(state)  # undo the BatchNorm statistics of the training pass
    return {k: v.detach() for k, v in losses.items()}


def _eval_inputs(inputs: List[Dict]) -> List[Dict]:
    """Inference inputs: without ground truth (AdelaiDet's BlendMask takes the training path
    of its blender whenever the inputs carry instances)."""
    return [{k: v for k, v in x.items() if k != "instances"} for x in to_detectron2_inputs(inputs)]


def _fcos_hook(store: Dict):
    def hook(mod, args, out):
        store["logits"] = [t.detach().clone() for t in out[0]]
        store["bbox_reg"] = [t.detach().clone() for t in out[1]]
        store["ctrness"] = [t.detach().clone() for t in out[2]]
    return hook


def _condinst_fixture(name: str, checkout: str, seed: int) -> Dict:
    cfg, model = _build(name, checkout, seed)
    _randomise(model, name, seed)
    state = _state(model)
    inputs = synthetic_images(seed, sizes=IMAGE_SIZES[name])

    head: Dict = {}
    hooks = [model.proposal_generator.fcos_head.register_forward_hook(_fcos_hook(head)),
             model.mask_branch.register_forward_hook(
                 lambda m, a, out: head.__setitem__("mask_feats", out[0].detach().clone()))]
    mask_head = model.mask_head
    orig = mask_head.mask_heads_forward_with_coords

    def capture(mask_feats, mask_feat_stride, instances):
        out = orig(mask_feats, mask_feat_stride, instances)
        head["params"] = instances.mask_head_params.detach().clone()
        head["mask_logits"] = out.detach().clone()
        return out

    mask_head.mask_heads_forward_with_coords = capture
    model.eval()
    with torch.no_grad():
        results = model(_eval_inputs(inputs))
    for h in hooks:
        h.remove()
    del mask_head.mask_heads_forward_with_coords
    results = [instances_to_dict(r["instances"]) for r in results]

    # Positives of the shipped config (central sampling around the masks' centres of mass).
    counted = {}
    fcos_outputs = model.proposal_generator.fcos_outputs
    orig_losses = fcos_outputs.fcos_losses

    def count(instances):
        extras, losses = orig_losses(instances)
        counted["num_pos"] = int(len(extras["instances"]))
        return extras, losses

    fcos_outputs.fcos_losses = count
    losses = _train_losses(model, state, inputs)
    del fcos_outputs.fcos_losses

    # TOPK_PROPOSALS_PER_IM (AdelaiDet: a quota per image split over its ground-truth objects).
    _, topk_model = _build(name, checkout, seed, ["MODEL.CONDINST.MAX_PROPOSALS", -1,
                                                  "MODEL.CONDINST.TOPK_PROPOSALS_PER_IM", TOPK])
    losses_topk = _train_losses(topk_model, state, inputs)

    # MAX_PROPOSALS sampling (random): record which positives AdelaiDet kept.
    _, sampled_model = _build(name, checkout, seed, ["MODEL.CONDINST.MAX_PROPOSALS", MAX_SAMPLED])
    kept = {}
    orig_fwd = sampled_model.mask_head.mask_heads_forward_with_coords

    def record(mask_feats, mask_feat_stride, instances):
        kept["im_inds"] = instances.im_inds.clone()
        kept["fpn_levels"] = instances.fpn_levels.clone()
        kept["locations"] = instances.locations.clone()
        return orig_fwd(mask_feats, mask_feat_stride, instances)

    sampled_model.mask_head.mask_heads_forward_with_coords = record
    torch.manual_seed(seed)
    losses_sampled = _train_losses(sampled_model, state, inputs)

    # The "w/ sem." configs: the same weights plus the auxiliary semantic head (random).
    _, sem_model = _build("condinst-sem", checkout, seed)
    _randomise(sem_model, name, seed + 10)
    sem_state = _state(sem_model)
    sem_state.update(state)
    sem_extra = {k: v for k, v in sem_state.items() if k not in state}
    losses_sem = _train_losses(sem_model, sem_state, inputs)

    return {
        "repo": "aim-uofa/AdelaiDet",
        "reference_config": REFERENCE_CONFIG[name],
        "d2seg_config": D2SEG_CONFIG[name],
        "d2seg_opts": _opts(name),
        "seed": seed,
        "notes": ("stubbed: " + stub_report() + ". No compiled op on CondInst's CPU path, nothing "
                  "replaced. Weights are float16 numbers stored in float16. Head outputs: FCOS's "
                  "per-level logits, bbox_reg (/ stride, after ReLU), ctrness; params (R, 169): the "
                  "controller's output at the detections of the batch, in order; mask_feats (mask branch, stride 8); mask_logits "
                  "(R, 1, H/4, W/4) of the detections of the batch in order (dynamic head, "
                  "upsampled x2). train_extra: num_pos (positives of the shipped config), topk and "
                  "losses_topk (MAX_PROPOSALS -1, TOPK_PROPOSALS_PER_IM topk); sem_config, "
                  "sem_weights and losses_sem: AdelaiDet's MS_R_50_3x_sem (SEMANTIC_LOSS_ON), the "
                  "same weights plus sem_weights (its semantic head); max_sampled, sampled (im_inds, "
                  "fpn_levels, locations of the positives AdelaiDet's random subsample kept) and "
                  "losses_sampled (MAX_PROPOSALS max_sampled)."),
        "weights": _half_weights(state),
        "inputs": inputs,
        "outputs": {"head": head, "results": results},
        "losses": losses,
        "train_extra": {"num_pos": counted["num_pos"], "topk": TOPK, "losses_topk": losses_topk,
                        "sem_config": D2SEG_CONFIG["condinst-sem"], "sem_reference_config":
                        REFERENCE_CONFIG["condinst-sem"], "sem_weights": _half_weights(sem_extra),
                        "losses_sem": losses_sem, "max_sampled": MAX_SAMPLED,
                        "sampled": kept, "losses_sampled": losses_sampled},
    }


def basis_semantic_labels(inst: Dict) -> torch.Tensor:
    """What AdelaiDet's ``datasets/prepare_thing_sem_from_instance.py`` writes for BlendMask's
    basis loss: (H, W) long, class + 1 of the instances painted in annotation order (later ones
    on top), 0 elsewhere."""
    masks, classes = inst["gt_masks"], inst["gt_classes"]
    out = torch.zeros(masks.shape[-2:], dtype=torch.long)
    for m, c in zip(masks, classes):
        out[m] = int(c) + 1
    return out


def _blendmask_fixture(name: str, checkout: str, seed: int) -> Dict:
    cfg, model = _build(name, checkout, seed)
    _randomise(model, name, seed)
    state = _state(model)
    inputs = synthetic_images(seed, sizes=IMAGE_SIZES[name])
    for d in inputs:
        d["basis_sem"] = basis_semantic_labels(d["instances"])

    head: Dict = {}
    hooks = [model.proposal_generator.fcos_head.register_forward_hook(_fcos_hook(head)),
             model.basis_module.register_forward_hook(
                 lambda m, a, out: head.__setitem__("bases", out[0]["bases"][0].detach().clone()))]
    blender = model.blender
    orig = blender.merge_bases

    def capture(rois, coeffs, *args, **kwargs):
        out = orig(rois, coeffs, *args, **kwargs)
        head["mask_logits"] = out.detach().clone().view(len(out), blender.pooler_resolution, -1)
        return out

    blender.merge_bases = capture
    model.eval()
    with torch.no_grad():
        results = model(_eval_inputs(inputs))
    for h in hooks:
        h.remove()
    del blender.merge_bases
    results = [instances_to_dict(r["instances"]) for r in results]

    extra = [{"basis_sem": d["basis_sem"].clone()} for d in inputs]
    losses = _train_losses(model, state, inputs, extra)
    for d in inputs:
        del d["basis_sem"]  # d2seg derives the same labels from the instances
    return {
        "repo": "aim-uofa/AdelaiDet",
        "reference_config": REFERENCE_CONFIG[name],
        "d2seg_config": D2SEG_CONFIG[name],
        "d2seg_opts": _opts(name),
        "seed": seed,
        "notes": ("stubbed: " + stub_report() + ". No compiled op on BlendMask's CPU path: its "
                  "pooler is Detectron2's ROIPooler (ROIAlignV2 = torchvision roi_align, aligned), "
                  "nothing replaced. Weights are float16 numbers stored in float16. Training gets "
                  "AdelaiDet's basis_sem labels made as its prepare_thing_sem_from_instance.py "
                  "does (instances painted in order, class + 1); they are not stored: "
                  "basis_semantic_labels() recomputes them from the instances. Head outputs: FCOS's "
                  "per-level logits, bbox_reg, ctrness; bases (N, 4, H/4, W/4); mask_logits "
                  "(R, 56, 56): the blended logits of the detections of the batch in order."),
        "weights": _half_weights(state),
        "inputs": inputs,
        "outputs": {"head": head, "results": results},
        "losses": losses,
    }


BUILDERS = {"condinst": _condinst_fixture, "blendmask": _blendmask_fixture}


def build_fixture(name: str, checkout: str, seed: int) -> Dict:
    install_stubs(checkout)
    with on_path(checkout):
        return BUILDERS[name](name, checkout, seed)
