"""Detectron2's COCOEvaluator on the annotations the loader kept.

COCOEvaluator reads the data set's original json (metadata ``json_file``) as its ground
truth. When d2seg's checking loader (:func:`d2seg.data.load_coco_checked`) dropped or
clipped annotations, that json differs from what the model trained on, and an annotation
the loader dropped can crash pycocotools at the end of a training (a polygon with fewer
than 3 points: ``TypeError: Argument 'bb' has incorrect type``) or make it fail on a
missing ``area``. :class:`CheckedCOCOEvaluator` evaluates on the loader's records instead,
converted by Detectron2's ``convert_to_coco_dict``; the loader logs its summary line
again, so the evaluation's log says what it left out.

Ground truth without masks (a box-only data set, which the loader accepts) is evaluated on
boxes only: pycocotools' mask evaluation would crash on it at the end of a training
(``KeyError: 'segmentation'``, or an ``IndexError`` on empty polygon lists).
"""
import contextlib
import io
import logging

from detectron2.data import DatasetCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.evaluation import COCOEvaluator
from pycocotools.coco import COCO

__all__ = ["CheckedCOCOEvaluator"]

logger = logging.getLogger(__name__)


def _without_segm(tasks):
    return tuple(t for t in tasks if t != "segm")


class CheckedCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` (same arguments) whose ground truth is the records of
    ``dataset_name`` whenever d2seg's loader changed them (their ``load_summary``);
    otherwise Detectron2's evaluator on the original json. Without a mask in the ground
    truth it evaluates boxes only (no ``segm`` task)."""

    def __init__(self, dataset_name, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        records = DatasetCatalog.get(dataset_name)
        self._gt_has_masks = any("segmentation" in a for r in records for a in r.get("annotations", ()))
        if not self._gt_has_masks and self._tasks and "segm" in self._tasks:
            self._tasks = _without_segm(self._tasks)
            self._log_box_only(dataset_name)
        summary = getattr(records, "load_summary", None)
        if summary is None or not summary.annotations_differ:
            return
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            api = COCO()
            api.dataset = convert_to_coco_dict(dataset_name)
            api.createIndex()
        self._coco_api = api
        self._do_evaluation = True
        logger.info(f"Evaluating {dataset_name} on the {summary.num_kept} annotations the loader "
                    f"kept, not on its json file (see its summary line)")

    def _tasks_from_predictions(self, predictions):
        tasks = super()._tasks_from_predictions(predictions)
        if not self._gt_has_masks and "segm" in tasks:
            self._log_box_only(self._metadata.name)
            return list(_without_segm(tasks))
        return tasks

    @staticmethod
    def _log_box_only(dataset_name):
        logger.warning(f"{dataset_name} has no mask in its ground truth (boxes only): predicted masks are "
                       f"not evaluated (no segm AP), boxes are")
