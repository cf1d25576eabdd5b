"""One trainer for every method: Detectron2's DefaultTrainer with

- the built-in ``shapes_*`` data sets generated before any loader or evaluator is built;
- d2seg's dataset mapper (clear errors naming unreadable images);
- an evaluator chosen from the data set's ``evaluator_type`` (COCO instances, LVIS,
  sem_seg, Cityscapes);
- optimisers from config: SGD (default), Adam, AdamW (``SOLVER.OPTIMIZER``), with
  Detectron2's gradient clipping and a "full_model" (global norm) clip type;
- atomic checkpoints (see :mod:`d2seg.engine.checkpoint`);
- DistributedDataParallel that also works on CPU (gloo), where Detectron2's default
  passes GPU device ids.
"""
import itertools
import logging
import os
import time
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    SemSegEvaluator,
)
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import get_d2seg_cfg
from .checkpoint import AtomicCheckpointer

logger = logging.getLogger(__name__)


def setup_cfg(config_file=None, opts=(), freeze=True, follow_dataset_classes=True):
    """A d2seg config: Detectron2 defaults + d2seg keys, then the YAML file, then ``opts``.

    An unknown key in the file or in ``opts`` raises ``KeyError`` naming the key (and the
    file), rather than being ignored. With ``follow_dataset_classes`` the class-count keys
    that neither the file nor ``opts`` sets follow the training data, and a set one that
    disagrees with the data raises ``ValueError`` (:mod:`d2seg.engine.classes`).
    """
    cfg = get_d2seg_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, AssertionError) as e:
            raise KeyError(f"{config_file}: unknown config key ({e})") from e
    if opts:
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, AssertionError) as e:  # yacs asserts on unknown keys in lists
            raise KeyError(f"command line: unknown config key ({e})") from e
    if follow_dataset_classes:
        from .classes import apply_dataset_classes, config_class_keys

        apply_dataset_classes(cfg, *config_class_keys(config_file, opts))
    if freeze:
        cfg.freeze()
    return cfg


def build_evaluator(cfg, dataset_name, output_folder=None):
    """Evaluator for ``dataset_name`` chosen from its metadata's ``evaluator_type``."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type", None)
    evaluators = []
    if evaluator_type in ("sem_seg", "coco_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type in ("coco", "coco_panoptic_seg"):
        from ..data import CheckedCOCOEvaluator  # the annotations the loader kept

        # the tasks the model predicts, not those found in its predictions: an evaluation
        # without any detection still logs segm/AP (NaN), so every evaluation has the same keys
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        evaluators.append(CheckedCOCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder))
    if evaluator_type == "lvis":
        evaluators.append(LVISEvaluator(dataset_name, output_dir=output_folder))
    if evaluator_type == "cityscapes_instance":
        evaluators.append(CityscapesInstanceEvaluator(dataset_name))
    if evaluator_type == "cityscapes_sem_seg":
        evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for data set '{dataset_name}' with evaluator_type={evaluator_type!r}"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def _add_full_model_gradient_clipping(optim_cls, clip_norm):
    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optim_cls.__name__ + "WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_optimizer(cfg, model):
    """SGD (Detectron2's), Adam or AdamW by ``SOLVER.OPTIMIZER``, with gradient clipping
    (``SOLVER.CLIP_GRADIENTS``; CLIP_TYPE "value", "norm" or "full_model")."""
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        optim_cls = torch.optim.SGD
        kwargs = dict(lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                      nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    elif name in ("ADAM", "ADAMW"):
        optim_cls = torch.optim.Adam if name == "ADAM" else torch.optim.AdamW
        kwargs = dict(lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), eps=cfg.SOLVER.EPS,
                      weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER: unknown optimizer {cfg.SOLVER.OPTIMIZER!r}; "
                         "expected one of SGD, ADAM, ADAMW")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _add_full_model_gradient_clipping(optim_cls, clip.CLIP_VALUE)
    else:
        optim_cls = maybe_add_gradient_clipping(cfg, optim_cls)
    return optim_cls(params, **kwargs)


_AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_precision(cfg, on_gpu):
    """The autocast dtype of ``SOLVER.AMP`` for a model on CUDA (``on_gpu``) or on CPU."""
    name = cfg.SOLVER.AMP.PRECISION or ("float16" if on_gpu else "bfloat16")
    if name not in _AMP_DTYPES:
        raise ValueError(f"SOLVER.AMP.PRECISION: unknown dtype {name!r}; expected "
                         "'float16', 'bfloat16' or '' (float16 on CUDA, bfloat16 on CPU)")
    if not on_gpu and name == "float16":
        raise ValueError("SOLVER.AMP.PRECISION float16 needs CUDA (a gradient scaler); the model "
                         "is on CPU (MODEL.DEVICE cpu): use SOLVER.AMP.PRECISION bfloat16 (or '') "
                         "or SOLVER.AMP.ENABLED False")
    return _AMP_DTYPES[name]


class CPUAutocastTrainer(SimpleTrainer):
    """SimpleTrainer whose forward (and loss) runs under ``torch.autocast("cpu", dtype)``:
    mixed-precision training on a CPU, where Detectron2's AMPTrainer requires CUDA.
    bfloat16 has float32's range, so no gradient scaling is needed; the backward pass and
    the optimizer step run outside autocast on the float32 parameters."""

    def __init__(self, model, data_loader, optimizer, precision=torch.bfloat16):
        super().__init__(model, data_loader, optimizer)
        self.precision = precision

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast("cpu", dtype=self.precision):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(v.float() for v in loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_train_loop(cfg, model, data_loader, optimizer, on_gpu):
    """SimpleTrainer, or with ``SOLVER.AMP.ENABLED`` Detectron2's AMPTrainer on CUDA and
    :class:`CPUAutocastTrainer` (bfloat16) on CPU."""
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    precision = amp_precision(cfg, on_gpu)
    if on_gpu:
        logger.info("Mixed precision: Detectron2's AMPTrainer, autocast %s on CUDA", precision)
        return AMPTrainer(model, data_loader, optimizer, precision=precision)
    logger.info("Mixed precision on CPU: autocast %s (SOLVER.AMP.ENABLED; Detectron2's "
                "AMPTrainer needs CUDA)", precision)
    return CPUAutocastTrainer(model, data_loader, optimizer, precision=precision)


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer for every d2seg method (see the module docstring)."""

    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__, with a CPU-capable DDP and an atomic
        # checkpointer; TrainerBase.__init__ is called directly on purpose.
        super(DefaultTrainer, self).__init__()
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        from ..data import prepare_datasets
        from ..layers import roi_align_backward_from_config

        prepare_datasets(cfg)
        roi_align_backward_from_config(cfg)  # MODEL.FAST_ROI_ALIGN_BACKWARD (d2seg.layers.roi_align)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_gpu = next(model.parameters()).is_cuda
        model = create_ddp_model(
            model, broadcast_buffers=False, **({} if on_gpu else {"device_ids": None})
        )
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer, on_gpu)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """Detectron2's hooks, with validation losses, the best checkpoint and early
        stopping after its evaluation (:mod:`d2seg.engine.hooks`)."""
        from .hooks import build_validation_hooks

        return build_validation_hooks(self, super().build_hooks())

    def train(self):
        """DefaultTrainer.train; an early stop (``SOLVER.EARLY_STOP_PATIENCE``) ends it
        cleanly, returning the last evaluation's results."""
        from .hooks import EarlyStop

        try:
            return super().train()
        except EarlyStop:
            return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's build_model, with P6/P7 top blocks that are safe under CPU autocast
        (see :class:`d2seg.fcos.backbone.P6P7`)."""
        from ..fcos.backbone import use_safe_top_blocks

        model = super().build_model(cfg)
        use_safe_top_blocks(model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        from ..data import D2SegDatasetMapper

        return build_detection_train_loader(cfg, mapper=D2SegDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        from ..data import D2SegDatasetMapper

        return build_detection_test_loader(cfg, dataset_name, mapper=D2SegDatasetMapper(cfg, is_train=False))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test on the prepared data sets, with the model run at
        ``TEST.PRECISION`` (:func:`d2seg.engine.precision.at_precision`)."""
        from ..data import prepare_datasets
        from .precision import at_precision

        prepare_datasets(cfg)
        return super().test(cfg, at_precision(cfg, model), evaluators)
