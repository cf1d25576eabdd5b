"""Training and evaluation for every d2seg method: one trainer on Detectron2's."""
from .checkpoint import AtomicCheckpointer
from .trainer import Trainer, build_evaluator, build_optimizer, setup_cfg

__all__ = ["AtomicCheckpointer", "Trainer", "build_evaluator", "build_optimizer", "setup_cfg"]
