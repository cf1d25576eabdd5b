#!/usr/bin/env python
"""How many training positives does each ground-truth object get, per method?

For every GT instance of the first N training images, the number of locations / grid cells /
anchors / proposals that the method's OWN target assignment in d2seg makes positive for that
instance, summed over the FPN levels (and per level), then summarised per method: mean,
median, fraction of objects with 0 positives and with <= 2, over all objects and split by
COCO area (small < 32^2, medium < 96^2, large; area = the annotation's mask pixel count, the
``area`` COCOeval's APs / APm use), plus which level each object goes to.

    OMP_NUM_THREADS=1 DETECTRON2_DATASETS=/work/main/datasets .venv/bin/python \\
        dev/diagnose/positives.py [--configs configs/FCOS/fcos_R18_shapes.yaml ...] \\
        [--images 200] [--augment] [--output DIR]

Data: the config's first training data set (``DATASETS.TRAIN``), records filtered as
Detectron2's trainer does (``get_detection_dataset_dicts`` with
``DATALOADER.FILTER_EMPTY_ANNOTATIONS``), the first N records in data-set order, through
``build_detection_train_loader`` with the trainer's mapper (``D2SegDatasetMapper(cfg,
is_train=True)``) in batches of ``SOLVER.IMS_PER_BATCH`` (the padded batch size is what the
grids span), an ``InferenceSampler`` instead of the shuffling ``TrainingSampler`` and no
incomplete batch dropped. Augmentation: OFF by default (``INPUT.RANDOM_FLIP "none"``; the
shapes configs' resize to 128 is the identity on 128 px images), so the counts are those of
the images as stored; ``--augment`` keeps the config's augmentation (a horizontal flip with
probability 0.5 on shapes; the RNG is seeded with ``SEED``).

Which code computes the targets (read from d2seg; nothing of the assignment is re-implemented
here, only the positives it returns are counted per GT index):

* SOLO, Decoupled SOLO, SOLOv2 (``SOLOBase`` meta-architectures, projects/solo/): the loss
  calls ``d2seg.solo.targets.assign_grid_targets`` (ground truth -> owner of every grid cell
  of every level). It is called here exactly as ``SOLOBase.losses`` calls it, with the
  attributes of the model built from the config (num_grids, scale_ranges, sigma,
  center_convention, cell_conflict) and the padded size of the batch from the model's own
  ``preprocess_image``; no forward pass is needed. A positive of a GT = a cell of
  ``LevelTargets.pos_gt`` equal to its index (with CELL_CONFLICT "later" a shared cell counts
  for every claimant, as it gets a mask target for each). Levels: the grids of
  NUM_GRIDS on INSTANCE_IN_FEATURES.
* FCOS and the methods built on it (``OneStageDetector``: FCOS, CondInst, BlendMask, MEInst):
  FCOS computes its targets inside its training forward (``FCOS._losses`` ->
  ``d2seg.fcos.targets.assign_targets``) and returns the positives in
  ``FCOSOutputs.positives`` (``im_inds``, ``gt_inds``, ``fpn_levels``). The smallest faithful
  call is the detector's own training path up to there: ``preprocess_image``, the backbone,
  the mask head's ``prepare_targets`` (CondInst sets ``gt_centers``, its masks' centres of
  mass, for central sampling), then ``proposal_generator(images, features, gt)`` in training
  mode (without the mask head's ``top_module``, which does not affect the targets), under
  ``torch.no_grad`` on a freshly initialised model (targets do not depend on the weights).
  Levels: MODEL.FCOS.IN_FEATURES.
* Mask R-CNN (``GeneralizedRCNN`` with Detectron2's RPN and StandardROIHeads): two rows.
  ``RPN anchors``: ``RPN.label_and_sample_anchors(anchors, gt)`` on the anchors of the
  model's ``anchor_generator`` over the backbone's features (IoU >= 0.7, plus each GT's
  best anchors, then at most 256 anchors sampled per image with half positive: with a few
  objects per image every positive is kept); it returns the matched GT box per anchor, which
  is mapped back to its GT index by exact equality. Levels: RPN.IN_FEATURES. ``ROI fg
  proposals``: the proposals of the RPN's training forward (POST_NMS_TOPK_TRAIN per image)
  through ``ROIHeads.label_and_sample_proposals`` (the GT boxes appended as proposals,
  IoU >= 0.5 foreground, BATCH_SIZE_PER_IMAGE sampled with POSITIVE_FRACTION); the GT index
  is carried as an extra ``gt_*`` field, which that function copies to the sampled
  proposals. On a FRESHLY INITIALISED model the proposals are about the anchors in random
  order, so this row is the count at the start of training (a trained RPN concentrates its
  proposals on the objects, and the row then grows up to the sampling cap); ``--weights``
  loads a checkpoint for the Mask R-CNN configs instead. One level ("roi").

``--classify --model CONFIG WEIGHTS [--model ...]`` (SOLO and FCOS families): instead of
counting, how good each TRAINED model's classifier is at exactly its own positives, on held-out
data: the records of ``DATASETS.TEST[0]`` (default all; ``--images N``: the first N) through
the trainer's mapper with the TEST-time resize and no flip (annotations kept), one image per
batch as the evaluation runs. The checkpoint must fit the model exactly (every key, no
other). The model is in eval mode throughout (BatchNorm would use its running statistics;
the shapes configs use GroupNorm, which has none; nothing is trained or updated). SOLO: the
category branch (``model.predict``) as ``SOLOBase.forward`` runs it, sigmoid, read at the
cells ``assign_grid_targets`` gives each object (also after SOLO's inference ``point_nms``).
FCOS family: only FCOS's own module flag is set to training for its forward, so that it
assigns targets and returns ``positives.logits_pred`` (the classification logits at the
positive locations), while its head and every other module stay in eval mode; the mask
head's ``top_module`` is not run. Per model: (a) top-1 accuracy over all positives
(argmax over classes == GT class), (b) mean max probability and mean GT-class probability
there, (c) object-level accuracy: the class at the object's best positive (highest max
probability), also by COCO area, (d) positives per object above 0.3 (duplicate candidates;
for SOLO also after point NMS), and the confusion matrix GT class x class at the best
positive (column "none": objects without positives), class names from the data set's
metadata. ``--output`` writes classify.json with every object's scores at its positives.
Needs no pretrained backbone: add ``MODEL.WEIGHTS ""``.

    OMP_NUM_THREADS=1 DETECTRON2_DATASETS=/work/main/datasets .venv/bin/python \\
        dev/diagnose/positives.py --classify \\
        --model configs/FCOS/fcos_R18_shapes.yaml out/fcos/model_final.pth \\
        --model configs/SOLO/solo_shapes.yaml out/solo/model_final.pth MODEL.WEIGHTS ""

Runs in well under a minute for the default configs and 200 images on one thread. On the shapes
data the flip of ``--augment`` leaves the counts unchanged (the grids and the FCOS locations are
symmetric about the image centre).
"""
import argparse
import json
import logging
import math
import os
import statistics
import sys
from typing import Dict, List, Sequence

import torch

import d2seg  # noqa: F401  (registers the methods and the shapes data sets)
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import InferenceSampler
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from d2seg.data.mapper import D2SegDatasetMapper
from d2seg.engine import setup_cfg
from d2seg.fcos.one_stage import OneStageDetector
from d2seg.solo import SOLOBase
from d2seg.solo.inference import point_nms
from d2seg.solo.targets import assign_grid_targets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIGS = (
    "configs/FCOS/fcos_R18_shapes.yaml",
    "configs/SOLO/solo_shapes.yaml",
    "configs/SOLO/decoupled_solo_shapes.yaml",
    "configs/SOLO/solov2_shapes.yaml",
    "configs/quick/mask_rcnn_shapes.yaml",
)
SMALL_AREA, MEDIUM_AREA = 32 ** 2, 96 ** 2
GROUPS = ("all", "small", "medium", "large")


# ------------------------------------------------------------------------------------------
# Per method: a batch of mapped inputs -> {row name: [(G_i, L) positives per GT and level]}
# ------------------------------------------------------------------------------------------

def method_family(model) -> str:
    """"solo", "fcos" or "rcnn" (the assignment code the model uses); ValueError otherwise."""
    if isinstance(model, SOLOBase):
        return "solo"
    if isinstance(model, OneStageDetector):
        if not hasattr(model.proposal_generator, "strides"):
            raise ValueError(f"OneStageDetector with proposal generator "
                             f"{type(model.proposal_generator).__name__}: only FCOS is supported")
        return "fcos"
    from detectron2.modeling import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        return "rcnn"
    raise ValueError(f"MODEL.META_ARCHITECTURE {type(model).__name__}: positives are counted for "
                     f"SOLO / DecoupledSOLO / SOLOv2, OneStageDetector (FCOS) and GeneralizedRCNN")


def level_names(model) -> Dict[str, List[str]]:
    """{row: level names} in the order of the (G, L) counts of :func:`count_positives`."""
    fam = method_family(model)
    if fam == "solo":
        return {"": [f"{f} S={s} [{lo:g},{hi:g}]" for f, s, (lo, hi) in
                     zip(model.instance_in_features, model.num_grids, model.scale_ranges)]}
    if fam == "fcos":
        pg = model.proposal_generator
        return {"": [f"{f} s={s} [{max(lo, 0):g},{hi:g}]" if hi < 1e7 else f"{f} s={s} [{lo:g},inf)"
                     for f, s, (lo, hi) in zip(pg.in_features, pg.strides, pg.size_ranges)]}
    rpn = model.proposal_generator
    return {"RPN anchors": list(rpn.in_features), "ROI fg proposals": ["roi"]}


def _gt_instances(model, batch):
    return [x["instances"].to(model.device) for x in batch]


def _tally(gt, levels, img_inds, gt_inds, lvl_inds):
    """Per image, an (objects, levels) count of the positives given as (image, object, level) triples."""
    out = [torch.zeros((len(inst), levels), dtype=torch.long) for inst in gt]
    for img, g, lvl in zip(img_inds, gt_inds, lvl_inds):
        out[img][g, lvl] += 1
    return out


def _solo_counts(model, batch):
    gt = _gt_instances(model, batch)
    padded = tuple(model.preprocess_image(batch).tensor.shape[-2:])
    targets = assign_grid_targets(gt, padded, model.num_grids, model.scale_ranges, model.sigma,
                                  model.num_classes, model.center_convention, model.cell_conflict)
    lvl = [torch.full_like(t.pos_gt, i) for i, t in enumerate(targets)]
    return {"": _tally(gt, len(targets), torch.cat([t.pos_img for t in targets]).tolist(),
                       torch.cat([t.pos_gt for t in targets]).tolist(), torch.cat(lvl).tolist())}


def _fcos_inputs(model, batch):
    """What FCOS's forward takes, as the detector prepares it: GT, images, backbone features."""
    gt = _gt_instances(model, batch)
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    if model.mask_head is not None:
        model.mask_head.prepare_targets(images, gt)
    return gt, images, features, model.proposal_generator


def _fcos_counts(model, batch):
    gt, images, features, pg = _fcos_inputs(model, batch)
    outputs = pg(images, features, gt)
    pos = outputs.positives
    return {"": _tally(gt, len(pg.strides), pos.im_inds.tolist(), pos.gt_inds.tolist(), pos.fpn_levels.tolist())}


def _rcnn_counts(model, batch):
    gt = _gt_instances(model, batch)
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    rpn = model.proposal_generator
    anchors = rpn.anchor_generator([features[f] for f in rpn.in_features])
    per_level = [len(a) for a in anchors]
    level_of = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(per_level)])
    gt_labels, matched_boxes = rpn.label_and_sample_anchors(anchors, gt)
    rpn_out = []
    for inst, labels, boxes in zip(gt, gt_labels, matched_boxes):
        counts = torch.zeros((len(inst), len(per_level)), dtype=torch.long)
        pos = (labels == 1).nonzero()[:, 0]
        if len(pos):
            same = (boxes[pos][:, None, :] == inst.gt_boxes.tensor[None]).all(dim=2)  # (P, G)
            if not bool(same.any(dim=1).all()):
                raise RuntimeError("an RPN positive anchor's matched box is none of the GT boxes")
            g = same.float().argmax(dim=1)  # the first of identical boxes
            for gi, lvl in zip(g.tolist(), level_of[pos].tolist()):
                counts[gi, lvl] += 1
        rpn_out.append(counts)

    proposals, _ = rpn(images, features, gt)
    targets = []
    for inst in gt:
        t = Instances(inst.image_size, gt_boxes=inst.gt_boxes, gt_classes=inst.gt_classes)
        t.gt_index_for_count = torch.arange(len(inst))
        targets.append(t)
    sampled = model.roi_heads.label_and_sample_proposals(proposals, targets)
    roi_out = []
    for inst, p in zip(gt, sampled):
        fg = p.gt_classes != model.roi_heads.num_classes
        counts = torch.zeros((len(inst), 1), dtype=torch.long)
        if fg.any():
            counts[:, 0] = torch.bincount(p.gt_index_for_count[fg], minlength=len(inst))
        roi_out.append(counts)
    return {"RPN anchors": rpn_out, "ROI fg proposals": roi_out}


@torch.no_grad()
def count_positives(model, batch) -> Dict[str, List[torch.Tensor]]:
    """Positives per GT instance and level of one training batch.

    Args:
        model: a model built from a config (``build_model``), put in training mode here.
        batch: list of mapped inputs (``"image"`` (3, H, W), ``"instances"`` with gt_boxes,
            gt_classes and, where the method uses them, gt_masks).
    Returns:
        {row: [per image a (G, L) long tensor]}: row "" for one-row methods, "RPN anchors"
        and "ROI fg proposals" for Mask R-CNN; L levels as :func:`level_names` names them.
    """
    model.train()
    fam = method_family(model)
    with EventStorage(0):  # Detectron2's RPN / ROI heads log their training statistics
        return {"solo": _solo_counts, "fcos": _fcos_counts, "rcnn": _rcnn_counts}[fam](model, batch)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

def annotation_area(anno, height, width) -> float:
    """COCO area of a record's annotation: its mask's pixel count (RLE or polygons), the box
    area when it has no segmentation."""
    import pycocotools.mask as mask_util

    seg = anno.get("segmentation")
    if seg is None:
        x, y, w, h = anno["bbox"][:4]  # shapes and COCO records are XYWH_ABS
        return float(w * h)
    if isinstance(seg, dict):
        if isinstance(seg.get("counts"), list):
            seg = mask_util.frPyObjects(seg, height, width)
        return float(mask_util.area(seg))
    rles = mask_util.frPyObjects(seg, height, width)
    return float(mask_util.area(mask_util.merge(rles)))


class MapperWithAreas:
    """The trainer's mapper, plus ``"gt_areas"``: the COCO area of each output instance (from
    the record's non-crowd annotations, whose order the mapper keeps)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, record):
        out = self.mapper(record)
        annos = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
        if len(annos) != len(out["instances"]):
            raise ValueError(f"image {record.get('image_id')} ({record.get('file_name')}): "
                             f"{len(annos)} non-crowd annotations but the mapper returned "
                             f"{len(out['instances'])} instances; their areas cannot be matched")
        out["gt_areas"] = torch.tensor([annotation_area(a, record["height"], record["width"])
                                        for a in annos], dtype=torch.float64)
        return out


def build_loader(cfg, num_images: int):
    """The first ``num_images`` training records through the trainer's mapper, in batches of
    SOLVER.IMS_PER_BATCH (see the module doc)."""
    records = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    if not records:
        raise ValueError(f"DATASETS.TRAIN {cfg.DATASETS.TRAIN} has no records")
    records = records[:num_images]
    mapper = MapperWithAreas(D2SegDatasetMapper(cfg, is_train=True))
    return build_detection_train_loader(
        records, mapper=mapper, sampler=InferenceSampler(len(records)),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH, aspect_ratio_grouping=False, num_workers=0,
        drop_last=False)


# ------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------

def area_group(area: float) -> str:
    return "small" if area < SMALL_AREA else ("medium" if area < MEDIUM_AREA else "large")


def summarize(counts: Sequence[int]) -> dict:
    """mean, median, fraction with 0 and with <= 2 positives, min, max of ``counts``."""
    n = len(counts)
    if n == 0:
        return {"objects": 0}
    return {
        "objects": n,
        "mean": sum(counts) / n,
        "median": float(statistics.median(counts)),
        "frac_0": sum(c == 0 for c in counts) / n,
        "frac_le2": sum(c <= 2 for c in counts) / n,
        "min": int(min(counts)),
        "max": int(max(counts)),
    }


def summarize_objects(objects: List[dict], levels: List[str]) -> dict:
    """Per area group the summary of the total positives; per level the fraction of objects
    with positives there and their mean count there."""
    groups = {}
    for g in GROUPS:
        sel = [o["positives"] for o in objects if g == "all" or o["area_group"] == g]
        if sel or g == "all":
            groups[g] = summarize(sel)
    per_level = []
    n = max(len(objects), 1)
    for lvl, name in enumerate(levels):
        there = [o["per_level"][lvl] for o in objects if o["per_level"][lvl] > 0]
        per_level.append({
            "level": name,
            "frac_objects": len(there) / n,
            "mean_positives_there": (sum(there) / len(there)) if there else 0.0,
            "frac_small_objects": (sum(1 for o in objects if o["per_level"][lvl] > 0
                                       and o["area_group"] == "small")
                                   / max(1, sum(o["area_group"] == "small" for o in objects))),
        })
    num_levels = [sum(c > 0 for c in o["per_level"]) for o in objects]
    return {"groups": groups, "levels": per_level,
            "levels_per_object": {k: sum(x == k for x in num_levels) / n
                                  for k in sorted(set(num_levels))}}


def measure_config(config_file: str, num_images: int, augment: bool = False, weights: str = "",
                   opts: Sequence[str] = ()) -> Dict[str, dict]:
    """{row name: {"config", "levels", "objects", "summary"}} for one config."""
    extra = list(opts)
    if not augment:
        extra += ["INPUT.RANDOM_FLIP", "none"]
    cfg = setup_cfg(config_file, extra)
    seed_all_rng(cfg.SEED)
    model = build_model(cfg)
    fam = method_family(model)
    if weights:
        if fam != "rcnn":
            raise ValueError("--weights applies to Mask R-CNN configs only (the other methods' "
                             "targets do not depend on the weights)")
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(weights)
    names = level_names(model)
    stem = os.path.splitext(os.path.basename(config_file))[0]
    rows = {k: {"config": config_file, "family": fam, "levels": v, "objects": []}
            for k, v in names.items()}
    for batch in build_loader(cfg, num_images):
        counts = count_positives(model, batch)
        for key, per_image in counts.items():
            for x, c in zip(batch, per_image):
                inst = x["instances"]
                boxes = inst.gt_boxes.tensor
                sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
                for g in range(len(inst)):
                    area = float(x["gt_areas"][g])
                    rows[key]["objects"].append({
                        "image_id": x.get("image_id"), "index": g,
                        "class": int(inst.gt_classes[g]), "area": area,
                        "area_group": area_group(area), "box_sqrt_wh": float(sizes[g]),
                        "positives": int(c[g].sum()), "per_level": c[g].tolist(),
                    })
    out = {}
    for key, row in rows.items():
        row["summary"] = summarize_objects(row["objects"], row["levels"])
        out[f"{stem} {key}".strip()] = row
    return out


def markdown(results: Dict[str, dict]) -> str:
    lines = ["| method | objects | mean | median | 0 pos | <= 2 pos | min-max |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        for g, s in row["summary"]["groups"].items():
            if s["objects"] == 0:
                continue
            lines.append(f"| {name} ({g}) | {s['objects']} | {s['mean']:.2f} | {s['median']:g} | "
                         f"{100 * s['frac_0']:.1f}% | {100 * s['frac_le2']:.1f}% | "
                         f"{s['min']}-{s['max']} |")
    lines += ["", "| method | level | objects with positives there | small objects there | "
                  "mean positives there |", "|---|---|---|---|---|"]
    for name, row in results.items():
        for lv in row["summary"]["levels"]:
            lines.append(f"| {name} | {lv['level']} | {100 * lv['frac_objects']:.1f}% | "
                         f"{100 * lv['frac_small_objects']:.1f}% | "
                         f"{lv['mean_positives_there']:.2f} |")
    lines += ["", "| method | objects on 0 / 1 / 2 / ... levels |", "|---|---|"]
    for name, row in results.items():
        d = row["summary"]["levels_per_object"]
        lines.append(f"| {name} | " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in d.items()) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# --classify: the trained classifier's scores at each object's own positives (held-out data)
# ------------------------------------------------------------------------------------------

DUPLICATE_SCORE = 0.3


def _only_eval(model):
    """Eval mode everywhere; refuses norm layers that would behave differently from the
    evaluation (none: in eval mode BatchNorm uses its running statistics, GroupNorm has none)."""
    model.eval()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
            raise RuntimeError(f"{name}: BatchNorm still in training mode")


def _solo_scores(model, batch):
    gt = _gt_instances(model, batch)
    images = model.preprocess_image(batch)
    padded = tuple(images.tensor.shape[-2:])
    features = model.backbone(images.tensor)
    # the category branch as SOLOBase.forward runs it; at inference its logits go through
    # sigmoid and point_nms (SOLOBase.inference)
    cate_preds, _ = model.predict(features, model.level_features(features, padded))
    targets = assign_grid_targets(gt, padded, model.num_grids, model.scale_ranges, model.sigma,
                                  model.num_classes, model.center_convention, model.cell_conflict)
    img, g, lvl, scores, after_nms = [], [], [], [], []
    for level, (t, logits) in enumerate(zip(targets, cate_preds)):
        S = model.num_grids[level]
        if tuple(logits.shape[-2:]) != (S, S):
            raise RuntimeError(f"level {level}: category output {tuple(logits.shape)}, grid {S}")
        probs = logits.sigmoid().permute(0, 2, 3, 1)  # (N, S, S, C)
        kept = point_nms(logits.sigmoid()).permute(0, 2, 3, 1)
        rows, cols = t.pos_cell // S, t.pos_cell % S
        img.append(t.pos_img)
        g.append(t.pos_gt)
        lvl.append(torch.full_like(t.pos_gt, level))
        scores.append(probs[t.pos_img, rows, cols])
        after_nms.append(kept[t.pos_img, rows, cols])
    return (gt, torch.cat(img), torch.cat(g), torch.cat(lvl), torch.cat(scores),
            torch.cat(after_nms))


def _fcos_scores(model, batch):
    gt, images, features, pg = _fcos_inputs(model, batch)
    # FCOS computes its targets and positives only when its OWN flag says training; its head
    # (and every other module) stays in eval mode, so the logits are those of the evaluation
    pg.training = True
    try:
        out = pg(images, features, gt)
    finally:
        pg.training = False
    pos = out.positives
    return gt, pos.im_inds, pos.gt_inds, pos.fpn_levels, pos.logits_pred.sigmoid(), None


@torch.no_grad()
def scores_at_positives(model, batch) -> List[List[dict]]:
    """The trained classifier's class probabilities at every positive of every GT object.

    The model is put in eval mode (the logits are those of the evaluation); the positives are
    those of the method's own assignment (:func:`count_positives`).
    Returns:
        per image, per GT object: {"class", "scores": (P, C) probabilities at its P
        positives, "levels": (P,) level indices, "after_point_nms": (P, C) or None (SOLO:
        the probabilities after SOLO's inference point NMS, 0 where suppressed)}.
    """
    fam = method_family(model)
    if fam not in ("solo", "fcos"):
        raise ValueError(f"--classify supports the SOLO and FCOS families, not {type(model).__name__}")
    _only_eval(model)
    with EventStorage(0):
        gt, img, g, lvl, scores, after = (_solo_scores if fam == "solo" else _fcos_scores)(model, batch)
    out = []
    for i, inst in enumerate(gt):
        objs = []
        for k in range(len(inst)):
            sel = ((img == i) & (g == k)).nonzero()[:, 0]
            objs.append({"class": int(inst.gt_classes[k]), "scores": scores[sel].cpu(),
                         "levels": lvl[sel].cpu(),
                         "after_point_nms": None if after is None else after[sel].cpu()})
        out.append(objs)
    return out


# object sizes (square root of the COCO area, px) for the object-level accuracy by size: COCO's
# "small" (< 32) split finer, since most shapes objects are small
SIZE_BINS = (0, 12, 16, 20, 24, 32)


def size_bin(area: float) -> str:
    side = math.sqrt(max(area, 0.0))
    lows = [b for b in SIZE_BINS if side >= b]
    i = len(lows) - 1
    return f">= {SIZE_BINS[i]}" if i == len(SIZE_BINS) - 1 else f"{SIZE_BINS[i]}-{SIZE_BINS[i + 1]}"


def classification_summary(objects: List[dict], num_classes: int) -> dict:
    """(a) top-1 accuracy over all positives, (b) mean max probability and mean GT-class
    probability there, (c) object-level accuracy: the class at the object's best positive
    (highest max probability), also by COCO area group, by object size (:data:`SIZE_BINS`,
    where "area" is given) and by the level of the best positive (with the median size of its
    objects, where "levels" is given), (d) positives per object above DUPLICATE_SCORE (and,
    where given, still above it after SOLO's point NMS), the confusion matrix GT class x class
    at the best positive (column ``num_classes``: objects without positives).

    Args:
        objects: {"class", "scores" (P, C), "after_point_nms" (P, C) or None, "area_group",
        optionally "area" and "levels" (P,)}.
    """
    n_pos = correct_pos = 0
    sum_max = sum_gt = 0.0
    confusion = [[0] * (num_classes + 1) for _ in range(num_classes)]
    per_group = {g: [0, 0] for g in GROUPS}  # objects with positives, right at best positive
    per_size, per_level = {}, {}  # the same by size bin; by best positive's level (+ sizes)
    above, above_nms, no_pos = [], [], 0
    for o in objects:
        s, c = o["scores"], o["class"]
        if len(s) == 0:
            no_pos += 1
            confusion[c][num_classes] += 1
            continue
        top, arg = s.max(dim=1)
        n_pos += len(s)
        correct_pos += int((arg == c).sum())
        sum_max += float(top.sum())
        sum_gt += float(s[:, c].sum())
        best = int(top.argmax())
        pred = int(arg[best])
        confusion[c][pred] += 1
        for grp in ("all", o.get("area_group")):
            if grp in per_group:
                per_group[grp][0] += 1
                per_group[grp][1] += int(pred == c)
        if o.get("area") is not None:
            v = per_size.setdefault(size_bin(o["area"]), [0, 0])
            v[0] += 1
            v[1] += int(pred == c)
        if o.get("levels") is not None and len(o["levels"]) == len(s):
            v = per_level.setdefault(int(o["levels"][best]), [0, 0, []])
            v[0] += 1
            v[1] += int(pred == c)
            if o.get("area") is not None:
                v[2].append(math.sqrt(max(o["area"], 0.0)))
        above.append(int((top > DUPLICATE_SCORE).sum()))
        if o.get("after_point_nms") is not None:
            above_nms.append(int((o["after_point_nms"].max(dim=1).values > DUPLICATE_SCORE).sum()))
    with_pos = len(objects) - no_pos
    return {
        "objects": len(objects), "objects_without_positives": no_pos, "positives": n_pos,
        "accuracy_at_positives": correct_pos / n_pos if n_pos else float("nan"),
        "mean_max_score": sum_max / n_pos if n_pos else float("nan"),
        "mean_gt_score": sum_gt / n_pos if n_pos else float("nan"),
        "object_accuracy": per_group["all"][1] / with_pos if with_pos else float("nan"),
        "object_accuracy_by_area": {g: {"objects": v[0], "accuracy": v[1] / v[0]}
                                    for g, v in per_group.items() if g != "all" and v[0]},
        "object_accuracy_by_size": {b: {"objects": per_size[b][0], "accuracy": per_size[b][1] / per_size[b][0]}
                                    for b in map(size_bin, [x * x for x in SIZE_BINS]) if b in per_size},
        "object_accuracy_by_level": {lvl: {"objects": v[0], "accuracy": v[1] / v[0],
                                           "median_size": statistics.median(v[2]) if v[2] else None}
                                     for lvl, v in sorted(per_level.items())},
        "mean_positives_above": sum(above) / len(above) if above else float("nan"),
        "frac_objects_2plus_above": (sum(a >= 2 for a in above) / len(above)) if above else float("nan"),
        "mean_positives_above_after_point_nms": (sum(above_nms) / len(above_nms)) if above_nms else None,
        "confusion": confusion,
    }


def load_weights(model, weights: str) -> None:
    """A trainer checkpoint (``{"model": state_dict, ...}``) or a bare state dict, every key
    of the model present and no other (a checkpoint of another method fails here)."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint not found: {weights}")
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {k: (torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit the model: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")


def build_eval_inputs(cfg, num_images: int):
    """The first ``num_images`` records of DATASETS.TEST[0] as the evaluation sees them (the
    test-time resize, no flip), with their annotations as instances (and COCO areas)."""
    from detectron2.data import detection_utils
    from detectron2.data import transforms as T

    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: --classify needs a held-out data set")
    records = get_detection_dataset_dicts([cfg.DATASETS.TEST[0]], filter_empty=False)[:num_images]
    if not records:
        raise ValueError(f"DATASETS.TEST[0] {cfg.DATASETS.TEST[0]!r} has no records")
    mapper = D2SegDatasetMapper(cfg, is_train=True)  # keeps the annotations ...
    mapper.augmentations = T.AugmentationList(detection_utils.build_augmentation(cfg, is_train=False))
    mapper = MapperWithAreas(mapper)  # ... with the test-time resize only
    return [mapper(r) for r in records]


def classify_config(config_file: str, weights: str, num_images: int,
                    opts: Sequence[str] = (), model=None) -> dict:
    """Per object the scores at its positives and the summary, for one trained model."""
    from detectron2.data import MetadataCatalog

    cfg = setup_cfg(config_file, list(opts))
    if model is None:
        model = build_model(cfg)
        load_weights(model, weights)
    fam = method_family(model)
    num_classes = model.num_classes if fam == "solo" else model.proposal_generator.num_classes
    names = list(MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", []))
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    objects = []
    for x in build_eval_inputs(cfg, num_images):
        (per_obj,) = scores_at_positives(model, [x])
        for k, o in enumerate(per_obj):
            area = float(x["gt_areas"][k])
            o.update(image_id=x.get("image_id"), index=k, area=area, area_group=area_group(area))
            objects.append(o)
    return {"config": config_file, "weights": weights, "family": fam, "classes": names,
            "dataset": cfg.DATASETS.TEST[0], "objects": objects,
            "summary": classification_summary(objects, num_classes)}


def classify_markdown(results: Dict[str, dict]) -> str:
    lines = [f"| model | objects (0 pos) | positives | top-1 acc at positives | mean max score | "
             f"mean GT-class score | object acc (best positive) | small / medium / large | "
             f"positives > {DUPLICATE_SCORE} per object | objects with >= 2 | "
             f"> {DUPLICATE_SCORE} after point NMS |", "|" + "---|" * 11]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    for name, r in results.items():
        s = r["summary"]
        by_area = " / ".join(pct(s["object_accuracy_by_area"][g]["accuracy"])
                             if g in s["object_accuracy_by_area"] else "-"
                             for g in ("small", "medium", "large"))
        nms = s["mean_positives_above_after_point_nms"]
        lines.append(
            f"| {name} | {s['objects']} ({s['objects_without_positives']}) | {s['positives']} | "
            f"{pct(s['accuracy_at_positives'])} | {s['mean_max_score']:.3f} | "
            f"{s['mean_gt_score']:.3f} | {pct(s['object_accuracy'])} | {by_area} | "
            f"{s['mean_positives_above']:.2f} | {pct(s['frac_objects_2plus_above'])} | "
            f"{'-' if nms is None else f'{nms:.2f}'} |")
    sizes = [size_bin(x * x) for x in SIZE_BINS]
    lines += ["", "Object accuracy (class at the best positive) by object size, sqrt(COCO area) in px "
              "(objects):", "", "| model | " + " | ".join(sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    for name, r in results.items():
        by = r["summary"].get("object_accuracy_by_size", {})
        lines.append(f"| {name} | " + " | ".join(f"{pct(by[b]['accuracy'])} ({by[b]['objects']})" if b in by else "-"
                                                  for b in sizes) + " |")
    lines += ["", "Object accuracy by the level of the best positive (objects; median object size there, px):", ""]
    for name, r in results.items():
        by = r["summary"].get("object_accuracy_by_level", {})
        cells = [f"level {lvl}: {pct(v['accuracy'])} ({v['objects']}"
                 + (f"; {v['median_size']:.1f} px)" if v["median_size"] is not None else ")")
                 for lvl, v in by.items()]
        lines.append(f"- {name}: " + (", ".join(cells) if cells else "-"))
    for name, r in results.items():
        names = r["classes"]
        w = max(6, *(len(n) for n in names))
        lines += ["", f"{name}: GT class (rows) x class at the best positive (columns)", "```",
                  " " * w + "".join(f"{n[:w]:>{w + 1}}" for n in names + ["none"])]
        for n, row in zip(names, r["summary"]["confusion"]):
            lines.append(f"{n:<{w}}" + "".join(f"{v:>{w + 1}}" for v in row))
        lines.append("```")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="config files (relative to the repository or absolute)")
    p.add_argument("--images", type=int, default=None,
                   help="first N images (default: 200 training images; with --classify all "
                        "of DATASETS.TEST[0])")
    p.add_argument("--augment", action="store_true",
                   help="keep the config's augmentation (default: INPUT.RANDOM_FLIP none)")
    p.add_argument("--weights", default="", help="checkpoint for the Mask R-CNN configs")
    p.add_argument("--classify", action="store_true",
                   help="instead of counting: the trained classifier's scores at each object's "
                        "positives on DATASETS.TEST[0], for every --model")
    p.add_argument("--model", nargs=2, action="append", default=[], metavar=("CONFIG", "WEIGHTS"),
                   help="with --classify (repeatable): a SOLO- or FCOS-family config and its "
                        "trained checkpoint")
    p.add_argument("--output", default="", help="folder for positives.json / classify.json")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every config")
    args = p.parse_args(argv)
    if args.images is not None and args.images < 1:
        p.error("--images must be >= 1")
    if args.classify and not args.model:
        p.error("--classify needs at least one --model CONFIG WEIGHTS")
    if args.model and not args.classify:
        p.error("--model is for --classify")
    if args.classify and (args.weights or args.augment):
        p.error("--classify takes its checkpoints from --model and never augments")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("d2seg").setLevel(logging.WARNING)

    def resolve(c):
        return c if os.path.isabs(c) or os.path.isfile(c) else os.path.join(REPO, c)

    if args.classify:
        results = {}
        for config, weights in args.model:
            stem = os.path.splitext(os.path.basename(config))[0]
            results[stem] = classify_config(resolve(config), weights, args.images or 10 ** 9,
                                            args.opts)
        first = next(iter(results.values()))
        print(f"# trained classifiers at each object's own positives, "
              f"{first['dataset']} ({first['summary']['objects']} objects"
              f"{'' if args.images is None else f', first {args.images} images'})\n")
        print(classify_markdown(results))
        if args.output:
            os.makedirs(args.output, exist_ok=True)
            slim = {k: {**{kk: vv for kk, vv in r.items() if kk != "objects"},
                        "objects": [{"image_id": o["image_id"], "index": o["index"],
                                     "class": o["class"], "area": o["area"],
                                     "levels": o["levels"].tolist(),
                                     "scores": o["scores"].tolist()} for o in r["objects"]]}
                    for k, r in results.items()}
            with open(os.path.join(args.output, "classify.json"), "w") as f:
                json.dump({"images": args.images, "results": slim}, f)
            print(f"\nwrote {os.path.join(args.output, 'classify.json')}", file=sys.stderr)
        return results

    images = args.images or 200
    results = {}
    for c in args.configs:
        results.update(measure_config(resolve(c), images, args.augment, args.weights, args.opts))
    text = markdown(results)
    print(f"# positives per GT object, first {images} training images, augmentation "
          f"{'as the config' if args.augment else 'off'}\n")
    print(text)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "positives.json"), "w") as f:
            json.dump({"images": images, "augment": args.augment, "results": results}, f)
        print(f"\nwrote {os.path.join(args.output, 'positives.json')}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
