"""Which configs the benchmark runs, what to call them, and the switch that makes every
model return its maximum number of detections.
"""
import glob
import os
import re

__all__ = [
    "YARDSTICK",
    "SEMANTIC_YARDSTICK",
    "discover_shapes_configs",
    "method_name",
    "score_threshold_keys",
    "all_detections_opts",
]

# Detectron2's Mask R-CNN under the common budget: the first row, and the reference of
# the "x yardstick" ratios.
YARDSTICK = os.path.join("configs", "quick", "mask_rcnn_shapes.yaml")
# Detectron2's Semantic FPN: the reference of the semantic-segmentation rows.
SEMANTIC_YARDSTICK = os.path.join("configs", "quick", "semantic_fpn_shapes.yaml")

# Display names of the known shapes configs (path relative to configs/, no extension).
# A config not listed here is named after its folder (configs/<Method>/...).
_METHOD_NAMES = {
    "quick/mask_rcnn_shapes": "Mask R-CNN (yardstick)",
    "FCOS/fcos_R18_shapes": "FCOS (box only)",
    "FCOS/retinanet_shapes": "RetinaNet (box only)",
    "SparseInst/sparse_inst_r18_giam_shapes": "SparseInst (G-IAM)",
    "MEInst/meinst_R18_shapes": "MEInst",
    "SOLO/solo_shapes": "SOLO",
    "SOLO/decoupled_solo_shapes": "Decoupled SOLO",
    "SOLO/solov2_shapes": "SOLOv2",
    "PointRend/pointrend_rcnn_R18_shapes": "PointRend (Mask R-CNN)",
    "PointRend/pointrend_sparseinst_r18_giam_shapes": "SparseInst + PointRend refiner",
    "CondInst/condinst_R18_shapes": "CondInst",
    "BlendMask/blendmask_R18_shapes": "BlendMask",
    "PointINS/pointins_fcos_R18_shapes": "PointINS (FCOS)",
    "PointINS/pointins_retinanet_R18_shapes": "PointINS (RetinaNet)",
    "quick/semantic_fpn_shapes": "Semantic FPN (semantic yardstick)",
    "PointRend/pointrend_semantic_R18_shapes": "PointRend (Semantic FPN)",
}

# Leaf names of test-time score thresholds (detections scoring below are dropped):
# ROI_HEADS/RETINANET.SCORE_THRESH_TEST, FCOS.INFERENCE_TH_TEST, SOLO.SCORE_THR and
# UPDATE_THR (after Matrix NMS), SPARSE_INST.CLS_THRESHOLD, and the same spellings in
# any method added later. Training-time thresholds (*_TRAIN) and mask/NMS/IoU
# thresholds are not score thresholds and are never touched.
_SCORE_THRESHOLD_NAME = re.compile(
    r"^(SCORE_THRESH(_TEST)?|SCORE_THR(ESHOLD)?(_TEST)?|CLS_THR(ESH|ESHOLD)?(_TEST)?|"
    r"INFERENCE_TH(_TEST)?|UPDATE_THR)$"
)


def discover_shapes_configs(repo_root):
    """Every ``configs/**/*shapes*.yaml`` under ``repo_root`` (Base-* files excluded),
    the yardstick first, the others sorted by path. Paths are relative to repo_root."""
    root = os.path.join(repo_root, "configs")
    found = sorted(
        os.path.relpath(p, repo_root)
        for p in glob.glob(os.path.join(root, "**", "*shapes*.yaml"), recursive=True)
        if not os.path.basename(p).startswith("Base-")
    )
    if YARDSTICK in found:
        found.remove(YARDSTICK)
        found.insert(0, YARDSTICK)
    return found


def method_name(config_file):
    """A display name for ``config_file`` (see _METHOD_NAMES; else its folder name)."""
    path = os.path.normpath(os.path.abspath(config_file)).replace(os.sep, "/")
    if "/configs/" in path:
        rel = path.rsplit("/configs/", 1)[1]
        key = os.path.splitext(rel)[0]
        if key in _METHOD_NAMES:
            return _METHOD_NAMES[key]
        if "/" in rel:
            return rel.split("/")[0]
    return os.path.splitext(os.path.basename(path))[0]


def score_threshold_keys(cfg):
    """Full names of the test-time score-threshold keys under ``cfg.MODEL``."""
    keys = []

    def walk(node, prefix):
        for name, value in node.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{name}.")
            elif _SCORE_THRESHOLD_NAME.match(name) and isinstance(value, (int, float)):
                keys.append(prefix + name)

    walk(cfg.MODEL, "MODEL.")
    return sorted(keys)


def all_detections_opts(cfg, value=0.0):
    """``KEY VALUE`` pairs that set every test-time score threshold of ``cfg`` to
    ``value`` (default 0): every model then returns its maximum number of detections
    (TEST.DETECTIONS_PER_IMAGE or the method's own maximum, after NMS), so latency is
    compared at equal output counts even with random weights."""
    opts = []
    for key in score_threshold_keys(cfg):
        opts += [key, str(float(value))]
    return opts
