"""Compatibility with Detectron2's own PointRend project (``detectron2.projects.point_rend``).

Weights: our modules use the parameter names of upstream's checkpoints
(``roi_heads.mask_head.coarse_head.*``, ``roi_heads.mask_head.point_head.fc{i}.*`` /
``.predictor.*``, ``sem_seg_head.coarse_sem_seg_head.*``, ``sem_seg_head.point_head.*``),
so upstream's published checkpoints load directly. :func:`convert_upstream_state_dict`
also maps the names of upstream's first (version 1) checkpoints, and is applied
automatically when such a checkpoint is loaded into :class:`D2SegPointRendROIHeads`.

Configs: upstream's keys live in MODEL.POINT_HEAD and MODEL.ROI_MASK_HEAD; ours in
MODEL.POINTREND, so both projects can be configured in one process.
:data:`UPSTREAM_TO_D2SEG_KEYS` is the key mapping and :func:`config_from_upstream` turns an
upstream PointRend config into ours.
"""
import re

__all__ = ["UPSTREAM_TO_D2SEG_KEYS", "UPSTREAM_SEMANTIC_KEYS", "UPSTREAM_TO_D2SEG_NAMES",
           "convert_upstream_state_dict", "config_from_upstream"]

# upstream config key -> d2seg config key
UPSTREAM_TO_D2SEG_KEYS = {
    "MODEL.ROI_MASK_HEAD.IN_FEATURES": "MODEL.POINTREND.COARSE_HEAD.IN_FEATURES",
    "MODEL.ROI_MASK_HEAD.FC_DIM": "MODEL.POINTREND.COARSE_HEAD.FC_DIM",
    "MODEL.ROI_MASK_HEAD.NUM_FC": "MODEL.POINTREND.COARSE_HEAD.NUM_FC",
    "MODEL.ROI_MASK_HEAD.OUTPUT_SIDE_RESOLUTION": "MODEL.POINTREND.COARSE_HEAD.OUTPUT_SIDE_RESOLUTION",
    "MODEL.ROI_MASK_HEAD.POINT_HEAD_ON": "MODEL.POINTREND.POINT_HEAD_ON",
    "MODEL.POINT_HEAD.IN_FEATURES": "MODEL.POINTREND.IN_FEATURES",
    "MODEL.POINT_HEAD.TRAIN_NUM_POINTS": "MODEL.POINTREND.TRAIN_NUM_POINTS",
    "MODEL.POINT_HEAD.OVERSAMPLE_RATIO": "MODEL.POINTREND.OVERSAMPLE_RATIO",
    "MODEL.POINT_HEAD.IMPORTANCE_SAMPLE_RATIO": "MODEL.POINTREND.IMPORTANCE_SAMPLE_RATIO",
    "MODEL.POINT_HEAD.SUBDIVISION_STEPS": "MODEL.POINTREND.SUBDIVISION_STEPS",
    "MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS": "MODEL.POINTREND.SUBDIVISION_NUM_POINTS",
    "MODEL.POINT_HEAD.FC_DIM": "MODEL.POINTREND.POINT_HEAD.FC_DIM",
    "MODEL.POINT_HEAD.NUM_FC": "MODEL.POINTREND.POINT_HEAD.NUM_FC",
    "MODEL.POINT_HEAD.CLS_AGNOSTIC_MASK": "MODEL.POINTREND.POINT_HEAD.CLS_AGNOSTIC_MASK",
    "MODEL.POINT_HEAD.COARSE_PRED_EACH_LAYER": "MODEL.POINTREND.POINT_HEAD.COARSE_PRED_EACH_LAYER",
    "MODEL.POINT_HEAD.COARSE_SEM_SEG_HEAD_NAME": "MODEL.POINTREND.SEM_SEG.COARSE_HEAD_NAME",
}

# upstream config key -> d2seg config key, for semantic segmentation (SEM_SEG_HEAD.NAME
# "PointRendSemSegHead"), in addition to the keys above
UPSTREAM_SEMANTIC_KEYS = {
    "MODEL.POINT_HEAD.TRAIN_NUM_POINTS": "MODEL.POINTREND.SEM_SEG.TRAIN_NUM_POINTS",
    "MODEL.POINT_HEAD.SUBDIVISION_STEPS": "MODEL.POINTREND.SEM_SEG.SUBDIVISION_STEPS",
    "MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS": "MODEL.POINTREND.SEM_SEG.SUBDIVISION_NUM_POINTS",
}

# upstream registry name -> d2seg registry name
UPSTREAM_TO_D2SEG_NAMES = {
    ("MODEL.ROI_HEADS.NAME", "PointRendROIHeads"): "D2SegPointRendROIHeads",
    ("MODEL.ROI_MASK_HEAD.NAME", "PointRendMaskHead"): "D2SegPointRendMaskHead",
    ("MODEL.ROI_MASK_HEAD.NAME", "CoarseMaskHead"): "D2SegPointRendMaskHead",
    ("MODEL.SEM_SEG_HEAD.NAME", "PointRendSemSegHead"): "D2SegPointRendSemSegHead",
    ("MODEL.POINT_HEAD.NAME", "StandardPointHead"): "PointRendMLPPointHead",
}

_V1_RENAMES = [
    (re.compile(r"^(?P<p>.*)mask_point_head\."), r"\g<p>mask_head.point_head."),
    (re.compile(r"^(?P<p>.*)mask_coarse_head\."), r"\g<p>mask_head.coarse_head."),
    (re.compile(r"^(?P<p>.*coarse_head\.)coarse_mask_fc(?P<i>\d+)\."), r"\g<p>fc\g<i>."),
]


def convert_upstream_state_dict(state_dict, prefix=""):
    """
    Upstream PointRend weights (any version) -> d2seg names. Current upstream names are
    already ours and pass unchanged; version-1 names (``roi_heads.mask_point_head.*``,
    ``roi_heads.mask_coarse_head.coarse_mask_fc1.*``) are renamed.

    Args:
        state_dict: name -> tensor.
        prefix: only keys under this prefix are considered (others pass unchanged).
    """
    out = {}
    for k, v in state_dict.items():
        new = k
        if k.startswith(prefix):
            rest = k[len(prefix):]
            for pattern, repl in _V1_RENAMES:
                rest = pattern.sub(repl, rest)
            new = prefix + rest
        out[new] = v
    return out


def config_from_upstream(upstream_cfg, d2seg_cfg=None):
    """
    An upstream PointRend config (after ``add_pointrend_config`` and its YAML) -> a d2seg
    config with the same model: Detectron2's own keys are copied, PointRend's keys are
    moved to MODEL.POINTREND and the registry names replaced by ours.
    """
    from detectron2.config import CfgNode

    from d2seg.config import get_d2seg_cfg

    cfg = d2seg_cfg.clone() if d2seg_cfg is not None else get_d2seg_cfg()
    cfg.defrost()

    def get(node, dotted):
        for part in dotted.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                return None
            node = node[part]
        return node

    def put(node, dotted, value):
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value

    def copy_common(src, dst, path=""):
        for key, value in src.items():
            full = f"{path}{key}"
            if full in ("MODEL.POINT_HEAD", "MODEL.IMPLICIT_POINTREND") or full in UPSTREAM_TO_D2SEG_KEYS:
                continue
            if isinstance(value, CfgNode):
                if key in dst and isinstance(dst[key], CfgNode):
                    copy_common(value, dst[key], full + ".")
            elif key in dst:
                dst[key] = value

    copy_common(upstream_cfg, cfg)
    for up_key, our_key in UPSTREAM_TO_D2SEG_KEYS.items():
        value = get(upstream_cfg, up_key)
        if value is not None:
            put(cfg, our_key, value)
    for (key, up_name), our_name in UPSTREAM_TO_D2SEG_NAMES.items():
        if get(upstream_cfg, key) == up_name:
            put(cfg, key.replace("MODEL.POINT_HEAD.", "MODEL.POINTREND.POINT_HEAD."), our_name)
    if get(upstream_cfg, "MODEL.SEM_SEG_HEAD.NAME") == "PointRendSemSegHead":
        # upstream's semantic head reads the same MODEL.POINT_HEAD point counts as its instance
        # head; ours has its own keys for them
        for up_key, our_key in UPSTREAM_SEMANTIC_KEYS.items():
            value = get(upstream_cfg, up_key)
            if value is not None:
                put(cfg, our_key, value)
    if get(upstream_cfg, "MODEL.ROI_HEADS.NAME") == "PointRendROIHeads":
        cfg.MODEL.ROI_MASK_HEAD.NAME = "D2SegPointRendMaskHead"
    return cfg
