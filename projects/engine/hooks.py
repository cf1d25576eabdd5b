"""Validation while training: validation losses, the best checkpoint, early stopping.

Three additions to Detectron2's hooks, all driven by ``TEST.EVAL_PERIOD`` and inserted
after its :class:`~detectron2.engine.hooks.EvalHook` (which logs the evaluator's AP) and
before the writers, so their values reach metrics.json, TensorBoard and the console at the
iteration they were measured:

- validation losses (``TEST.VALIDATION_LOSS``, on by default): the model's training losses
  on each data set of ``DATASETS.TEST``, averaged over its images, logged as
  ``validation_loss`` (their sum, as ``total_loss`` for training) and
  ``validation/<loss name>``; with several test sets as ``<data set>/validation_loss`` and
  ``<data set>/validation/<loss name>``, as Detectron2 prefixes AP keys by data set;
- :class:`BestCheckpointer` (``SOLVER.BEST_CHECKPOINT = (metric, mode)``): keeps
  ``model_best.pth`` (the weights that gave the best value of ``metric``, any key the
  evaluation logs, e.g. ``segm/AP``, ``bbox/AP50``, ``sem_seg/mIoU``, ``validation_loss``,
  prefixed by the data set's name when ``DATASETS.TEST`` has several) and
  ``model_best.json`` (the metric, its value and iteration, and every evaluation so far);
- early stopping (``SOLVER.EARLY_STOP_PATIENCE = N > 0``): training ends cleanly after N
  evaluations in a row without improving that metric; ``model_final.pth`` holds the weights
  at the stop.

``model_best.json`` lets ``--resume`` keep the best so far: a resumed run reads it, never
replaces ``model_best.pth`` with a worse model, and counts the evaluations without
improvement from it (evaluations at or after the iteration it resumes from are forgotten,
as they will be run again).
"""
import json
import logging
import math
import os

import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data import detection_utils as utils
from detectron2.engine import hooks
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import _atomic_write

__all__ = ["BestCheckpointer", "EarlyStop", "EvalPeriodicWriter", "build_validation_hooks",
           "validation_losses"]

logger = logging.getLogger(__name__)

BEST_CHECKPOINT_NAME = "model_best"


class EarlyStop(BaseException):
    """Raised by :class:`BestCheckpointer` to end the training loop early. A BaseException
    (like KeyboardInterrupt) so that Detectron2's loop does not log it as an error; the
    hooks' ``after_train`` still run, and :meth:`d2seg.engine.Trainer.train` returns."""


def validation_mapper(cfg):
    """d2seg's dataset mapper with the test-time resize but the training targets
    (instances, semantic labels): what the model needs to compute its losses."""
    from ..data import D2SegDatasetMapper

    kwargs = D2SegDatasetMapper.from_config(cfg, is_train=True)
    kwargs.update(augmentations=utils.build_augmentation(cfg, is_train=False), recompute_boxes=False)
    return D2SegDatasetMapper(**kwargs)


def _has_targets(dataset_name):
    return any("annotations" in d or "sem_seg_file_name" in d for d in DatasetCatalog.get(dataset_name))


def validation_losses(model, data_loader):
    """The model's training losses averaged over the images of ``data_loader``.

    The model runs in training mode (so that it returns its losses) without gradients, its
    normalisation layers with running statistics (``_BatchNorm`` in eval mode: they neither
    update their statistics from validation images nor synchronise across processes),
    under a forked random number generator (sampling in some losses leaves the training's
    random stream untouched); every module's mode is restored afterwards. In distributed
    training each process runs its share of the images and the sums are gathered.

    Args:
        model (nn.Module): a Detectron2 model (or DistributedDataParallel around one).
        data_loader: batches (lists of dicts) with the training targets.

    Returns:
        dict: {"validation_loss": sum of the losses, "validation": {loss name: mean}}, or
        {} when the loader had no images.
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module  # no gradient synchronisation: shards may differ in length
    modes = {m: m.training for m in model.modules()}  # restored exactly afterwards
    sums, count = {}, 0
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for batch in data_loader:
                losses = model(batch)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
                count += len(batch)
    finally:
        for m, training in modes.items():
            m.training = training
    totals, total_count = {}, 0
    for part_sums, part_count in comm.all_gather((sums, count)):
        for k, v in part_sums.items():
            totals[k] = totals.get(k, 0.0) + v
        total_count += part_count
    if not total_count:
        return {}
    means = {k: v / total_count for k, v in sorted(totals.items())}
    return {"validation_loss": sum(means.values()), "validation": means}


def _validation_function(trainer):
    """A no-argument function for :class:`EvalHook` giving the validation losses on
    every test set (prefixed by the data set's name when there are several)."""
    cfg = trainer.cfg
    loaders = {}
    batch_size = max(1, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())

    def run():
        results = {}
        for name in cfg.DATASETS.TEST:
            if name not in loaders:
                if not _has_targets(name):
                    logger.warning(f"Validation loss: data set '{name}' has no annotations, skipped")
                    loaders[name] = None
                else:
                    loaders[name] = build_detection_test_loader(
                        cfg, name, mapper=validation_mapper(cfg), batch_size=batch_size)
            if loaders[name] is None:
                continue
            losses = validation_losses(trainer.model, loaders[name])
            if losses:
                logger.info(f"Validation losses on {name}: validation_loss {losses['validation_loss']:.4f} ("
                            + ", ".join(f"{k} {v:.4f}" for k, v in losses["validation"].items()) + ")")
                results[name] = losses
        if len(cfg.DATASETS.TEST) == 1:
            return next(iter(results.values()), {})
        return results

    return run


class BestCheckpointer(HookBase):
    """Keeps ``model_best.pth`` and ``model_best.json`` in the output folder for the best
    value of a logged metric, and optionally stops training after ``patience`` evaluations
    without improvement (see the module docstring).

    Unlike Detectron2's BestCheckpointer, saving the best model does not move the
    ``last_checkpoint`` tag (``--resume`` continues from the latest periodic checkpoint, not
    from the best), and the best so far survives a resume.

    Args:
        eval_period (int): TEST.EVAL_PERIOD, the period of the hooks that log the metric.
        checkpointer: the trainer's checkpointer (its model and save folder; saves on the
            main process only).
        metric (str): a key of the event storage, e.g. "segm/AP" or "validation_loss".
        mode (str): "max" or "min".
        patience (int): stop after this many evaluations without improvement; 0: never.
    """

    def __init__(self, eval_period, checkpointer, metric, mode="max", patience=0):
        if mode not in ("max", "min"):
            raise ValueError(f"SOLVER.BEST_CHECKPOINT: mode must be 'max' or 'min', got {mode!r}")
        self._period = eval_period
        self._checkpointer = checkpointer
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.best = None  # {"value": float, "iteration": int}
        self.history = []  # [{"iteration": int, "value": float}], one per evaluation

    @property
    def state_file(self):
        return os.path.join(self._checkpointer.save_dir, BEST_CHECKPOINT_NAME + ".json")

    def _better(self, value, than):
        return than is None or (value > than if self.mode == "max" else value < than)

    def evaluations_without_improvement(self):
        """Evaluations logged after the best one."""
        if self.best is None:
            return len(self.history)
        return sum(1 for h in self.history if h["iteration"] > self.best["iteration"])

    def before_train(self):
        self.best, self.history = None, []
        if self.trainer.start_iter == 0 or not os.path.isfile(self.state_file):
            return
        with open(self.state_file) as f:
            state = json.load(f)
        if (state.get("metric"), state.get("mode")) != (self.metric, self.mode):
            logger.info(f"{self.state_file} tracks {state.get('metric')} ({state.get('mode')}), not "
                        f"{self.metric} ({self.mode}): starting a new best")
            return
        self.best = state["best"]
        self.history = [h for h in state["history"] if h["iteration"] < self.trainer.start_iter]
        logger.info(f"Resumed the best {self.metric}: {self.best['value']:.4f} at iteration "
                    f"{self.best['iteration']} ({self.evaluations_without_improvement()} evaluation(s) since)")

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._check(can_stop=True)

    def after_train(self):
        if self.trainer.iter + 1 >= self.trainer.max_iter:  # the final evaluation of a full run
            self._check(can_stop=False)

    def _check(self, can_stop):
        stop = False
        if comm.is_main_process():
            stop = self._update()
        if can_stop and self.patience > 0 and comm.all_gather(stop)[0]:
            iteration = self.trainer.iter
            logger.info(f"Early stop at iteration {iteration}: {self.metric} did not improve in "
                        f"{self.patience} evaluation(s) (best {self.best['value']:.4f} at iteration "
                        f"{self.best['iteration']}, in {BEST_CHECKPOINT_NAME}.pth)"
                        if comm.is_main_process() else f"Early stop at iteration {iteration}")
            # what PeriodicCheckpointer saves after the last iteration
            self._checkpointer.save("model_final", iteration=iteration)
            raise EarlyStop(iteration)

    def _update(self):
        """Compare the metric just logged with the best; save; return whether to stop."""
        storage = self.trainer.storage
        latest = storage.latest().get(self.metric)
        if latest is None:
            logger.warning(f"SOLVER.BEST_CHECKPOINT: metric '{self.metric}' is not logged; the logged "
                           f"keys: {', '.join(sorted(storage.latest()))}")
            return False
        if latest[1] != storage.iter:
            logger.warning(f"SOLVER.BEST_CHECKPOINT: the evaluation at iteration {storage.iter} gave no "
                           f"'{self.metric}' (last logged at iteration {latest[1]})")
            return False
        value, iteration = float(latest[0]), int(latest[1])
        if not math.isfinite(value):
            logger.warning(f"{self.metric} is {value} at iteration {iteration}: not a candidate for the best")
        self.history.append({"iteration": iteration, "value": value})
        if math.isfinite(value) and self._better(value, None if self.best is None else self.best["value"]):
            previous = self.best
            self.best = {"value": value, "iteration": iteration}
            self._save_best()
            logger.info(f"New best {self.metric}: {value:.4f} at iteration {iteration}"
                        + (f" (was {previous['value']:.4f} at iteration {previous['iteration']})" if previous else "")
                        + f"; saved {BEST_CHECKPOINT_NAME}.pth")
        else:
            logger.info(f"{self.metric} {value:.4f} at iteration {iteration}: not better than "
                        f"{self.best['value']:.4f} at iteration {self.best['iteration']} "
                        f"({self.evaluations_without_improvement()} evaluation(s) without improvement)"
                        if self.best else f"{self.metric} {value} at iteration {iteration}: no best yet")
        self._write_state()
        return self.patience > 0 and self.evaluations_without_improvement() >= self.patience

    def _save_best(self):
        data = {"model": self._checkpointer.model.state_dict(), "iteration": self.best["iteration"],
                "metric": {self.metric: self.best["value"]}}
        path = os.path.join(self._checkpointer.save_dir, BEST_CHECKPOINT_NAME + ".pth")
        _atomic_write(path, lambda f: torch.save(data, f))

    def _write_state(self):
        state = {"metric": self.metric, "mode": self.mode, "best": self.best, "history": self.history}
        _atomic_write(self.state_file, lambda f: json.dump(state, f, indent=1), mode="w")


class EvalPeriodicWriter(hooks.PeriodicWriter):
    """Detectron2's PeriodicWriter that also writes right after each evaluation. The event
    storage keeps only the latest value of a key, so with TEST.EVAL_PERIOD shorter than the
    writing period an evaluation would otherwise be replaced by the next one before it
    reaches metrics.json and TensorBoard."""

    def __init__(self, writers, period, eval_period):
        super().__init__(writers, period)
        self._eval_period = eval_period

    def after_step(self):
        it, max_iter = self.trainer.iter, self.trainer.max_iter
        evaluated = self._eval_period > 0 and (it + 1) % self._eval_period == 0 and it + 1 != max_iter
        if evaluated and not ((it + 1) % self._period == 0 or it == max_iter - 1):  # else written below
            for writer in self._writers:
                writer.write()
        super().after_step()


def best_checkpoint_setting(cfg):
    """(metric, mode) of SOLVER.BEST_CHECKPOINT, or None when it is empty; checked."""
    setting = tuple(cfg.SOLVER.BEST_CHECKPOINT)
    patience = cfg.SOLVER.EARLY_STOP_PATIENCE
    if not setting:
        if patience > 0:
            raise ValueError("SOLVER.EARLY_STOP_PATIENCE needs the metric to watch: set "
                             "SOLVER.BEST_CHECKPOINT, e.g. \"('segm/AP', 'max')\"")
        return None
    if len(setting) != 2 or not all(isinstance(s, str) for s in setting) or setting[1] not in ("max", "min"):
        raise ValueError(f"SOLVER.BEST_CHECKPOINT must be (metric, 'max' or 'min'), e.g. "
                         f"\"('segm/AP', 'max')\" or \"('validation_loss', 'min')\"; got {setting!r}")
    if cfg.TEST.EVAL_PERIOD <= 0:
        raise ValueError(f"SOLVER.BEST_CHECKPOINT {setting!r} needs evaluations during training: set "
                         "TEST.EVAL_PERIOD to a number of iterations > 0")
    if not cfg.DATASETS.TEST:
        raise ValueError("SOLVER.BEST_CHECKPOINT needs a data set to evaluate on: set DATASETS.TEST")
    return setting


def build_validation_hooks(trainer, default_hooks):
    """``default_hooks`` (Detectron2's DefaultTrainer.build_hooks) with the validation-loss
    EvalHook, then the BestCheckpointer, inserted after its EvalHook (before the writers),
    and a writer that also writes after each evaluation (:class:`EvalPeriodicWriter`)."""
    cfg = trainer.cfg
    setting = best_checkpoint_setting(cfg)
    extra = []
    if cfg.TEST.VALIDATION_LOSS and cfg.TEST.EVAL_PERIOD > 0 and cfg.DATASETS.TEST:
        extra.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, _validation_function(trainer)))
    if setting is not None:
        extra.append(BestCheckpointer(cfg.TEST.EVAL_PERIOD, trainer.checkpointer, *setting,
                                      patience=cfg.SOLVER.EARLY_STOP_PATIENCE))
    result = list(default_hooks)
    for i, h in enumerate(result):
        if type(h) is hooks.PeriodicWriter and cfg.TEST.EVAL_PERIOD > 0:
            result[i] = EvalPeriodicWriter(h._writers, h._period, cfg.TEST.EVAL_PERIOD)
    evals = [i for i, h in enumerate(result) if isinstance(h, hooks.EvalHook)]
    at = evals[-1] + 1 if evals else len(result)
    return result[:at] + extra + result[at:]
