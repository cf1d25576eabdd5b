"""Detectron2's COCOEvaluator on the annotations the loader kept.

COCOEvaluator reads the data set's original json (metadata ``json_file``) as its ground
truth. When d2seg's checking loader (:func:`d2seg.data.load_coco_checked`) dropped or
clipped annotations, that json differs from what the model trained on, and an annotation
the loader dropped can crash pycocotools at the end of a training (a polygon with fewer
than 3 points: ``TypeError: Argument 'bb' has incorrect type``) or make it fail on a
missing ``area``. :class:`CheckedCOCOEvaluator` evaluates on the loader's records instead,
converted by Detectron2's ``convert_to_coco_dict``; the loader logs its summary line
again, so the evaluation's log says what it left out.
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


class CheckedCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` (same arguments) whose ground truth is the records of
    ``dataset_name`` whenever d2seg's loader changed them (their ``load_summary``);
    otherwise exactly Detectron2's evaluator on the original json."""

    def __init__(self, dataset_name, *args, **kwargs):
        super().__init__(dataset_name, *args, **kwargs)
        records = DatasetCatalog.get(dataset_name)
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
