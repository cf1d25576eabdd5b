"""d2seg's config keys on top of Detectron2's defaults.

Each method contributes its keys through a function ``add_<method>_config(cfg)`` that is
listed in ``_METHOD_CONFIGS``; :func:`add_d2seg_config` applies them all, so any d2seg
YAML merges into a config built by :func:`get_d2seg_cfg`. Unknown keys in a YAML file
raise Detectron2's KeyError naming the key, which is what a user should see.
"""
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

_METHOD_CONFIGS = []


def register_config(fn):
    """Decorator for a method's ``add_*_config(cfg)`` so :func:`add_d2seg_config` runs it."""
    _METHOD_CONFIGS.append(fn)
    return fn


def add_shared_config(cfg):
    """Keys shared by all methods."""
    cfg.D2SEG = CN()
    # Built-in synthetic data set: generated under $DETECTRON2_DATASETS on first use.
    cfg.D2SEG.SHAPES = CN()
    cfg.D2SEG.SHAPES.NUM_TRAIN = 600
    cfg.D2SEG.SHAPES.NUM_VAL = 100
    cfg.D2SEG.SHAPES.IMAGE_SIZE = 128
    cfg.D2SEG.SHAPES.SEED = 0
    # Optimiser: "SGD" (Detectron2's default) or "ADAMW" / "ADAM"; betas and eps for Adam*.
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.EPS = 1e-8
    # Mixed precision (with SOLVER.AMP.ENABLED): the autocast dtype, "float16" or "bfloat16";
    # "" picks float16 on CUDA (Detectron2's AMPTrainer) and bfloat16 on CPU (the only
    # reduced dtype CPU autocast trains in without a gradient scaler). See docs/mixed_precision.md.
    cfg.SOLVER.AMP.PRECISION = ""
    # Validation while training (d2seg.engine.hooks), every TEST.EVAL_PERIOD iterations:
    # the training losses on DATASETS.TEST ("validation_loss", "validation/<loss>"), besides
    # the evaluator's AP; SOLVER.BEST_CHECKPOINT = (metric, "max" or "min"), e.g.
    # ("segm/AP", "max") or ("validation_loss", "min"), keeps model_best.pth; a patience > 0
    # stops after that many evaluations without improvement of that metric.
    cfg.TEST.VALIDATION_LOSS = True
    cfg.SOLVER.BEST_CHECKPOINT = ()
    cfg.SOLVER.EARLY_STOP_PATIENCE = 0
    # Inference-only speed-ups that change results by float rounding only (d2seg.layers.
    # inference_speed): FrozenBN folded into the backbone's convolutions, channels-last
    # activations. Read by OneStageDetector (FCOS, MEInst, CondInst, BlendMask, PointINS),
    # SOLO, SparseInst and D2SegSemanticSegmentor; Base-FCOS.yaml, Base-SOLOv2.yaml and
    # Base-SparseInst.yaml (COCO) set True (docs/benchmark.md, "Inference speed-ups at
    # parity": why not CondInst, BlendMask, SOLO v1 and PointRend semantic).
    cfg.MODEL.FAST_INFERENCE = False
    # Inference precision, "float32" or "bfloat16": with bfloat16 the model runs under
    # torch.autocast (CPU or CUDA) and its results are cast back to float32. Honoured by
    # evaluation (Trainer.test), d2seg.engine.Predictor (tools/demo.py) and tools/benchmark.py;
    # an error on a CPU without native bfloat16 (avx512_bf16 / amx_bf16) and for ONNX files.
    # See d2seg.engine.precision and docs/deploy.md ("Precision").
    cfg.TEST.PRECISION = "float32"
    # With TEST.PRECISION bfloat16: the per-candidate score layers (the class logits of
    # Detectron2's box predictor, in Mask R-CNN and PointRend; SparseInst's class and
    # objectness logits) still run in float32. With bfloat16's 8-bit mantissa, scores round to
    # ties and swap places in the ranking COCO AP is computed from (measured: SparseInst on
    # shapes lost up to 1.4 mask AP, none with this). Small Linear layers; False runs
    # everything under autocast. d2seg.engine.precision.SCORE_LAYERS; docs/deploy.md, "Precision".
    cfg.TEST.FLOAT32_SCORES = True
    # Training: d2seg's Trainer makes d2seg's CPU RoIAlign backward (bit-identical gradients,
    # faster, bounded memory; d2seg.layers.roi_align) torchvision's CPU kernel for the
    # process. Importing d2seg never does; False keeps torchvision's kernel.
    cfg.MODEL.FAST_ROI_ALIGN_BACKWARD = True


def flag_among_opts(opts):
    """The error message for the first command-line flag ("--resume") found among the
    KEY VALUE config overrides ``opts``, or None. Parsers read everything after the first
    KEY as overrides (argparse.REMAINDER), so a flag placed there would otherwise surface as
    an "unknown config key" or odd-length error."""
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if not flags:
        return None
    return (f"{flags[0]} is placed after the KEY VALUE config overrides ({' '.join(opts[:2])} "
            "...), where every word is read as a KEY or a VALUE: put the flags (--...) before "
            "the first KEY VALUE pair")


def add_d2seg_config(cfg):
    """Add every d2seg key (shared and per method) to a Detectron2 config, in place."""
    if hasattr(cfg, "D2SEG"):
        return cfg
    add_shared_config(cfg)
    for fn in _METHOD_CONFIGS:
        fn(cfg)
    return cfg


def get_d2seg_cfg():
    """Detectron2's default config with every d2seg key added."""
    cfg = get_cfg()
    add_d2seg_config(cfg)
    return cfg
