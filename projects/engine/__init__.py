"""Training and evaluation for every d2seg method: one trainer on Detectron2's."""
from .checkpoint import AtomicCheckpointer
from .precision import at_precision, inference_precision
from .predictor import Predictor
from .trainer import Trainer, build_evaluator, build_optimizer, setup_cfg

__all__ = ["AtomicCheckpointer", "Predictor", "Trainer", "at_precision", "build_evaluator", "build_optimizer",
           "inference_precision", "setup_cfg"]
