"""The exported file evaluates like the PyTorch model: for every shapes config with an export
graph, a model fitted to a few shapes images (tests/fitting.py, the learning tests' fits) is
exported and evaluated with Detectron2's evaluators (COCOEvaluator / SemSegEvaluator, through
d2seg's test loader) on the images it was fitted to; every AP (or mIoU) of the ONNX Runtime
file equals PyTorch's within 0.1. Slow: each fit takes tens of seconds."""
import os

import pytest

import d2seg  # noqa: F401
from d2seg.deploy import GRAPHS, ONNXModel, export_onnx
from d2seg.engine import Trainer

from fitting import SHAPES_CONFIGS, evaluate, fitted

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

METRICS = ("AP", "AP50", "AP75", "mIoU", "fwIoU", "pACC")


@pytest.mark.parametrize("config", SHAPES_CONFIGS)
def test_exported_file_scores_like_pytorch(config, tmp_path):
    fit = fitted(config)
    if type(fit.model) not in GRAPHS:
        pytest.skip(f"{type(fit.model).__name__} has no export graph")
    path = os.path.join(tmp_path, "model.onnx")
    export_onnx(fit.model, path, fit.cfg)
    expected = evaluate(fit)
    got = Trainer.test(fit.cfg, ONNXModel(path, fit.cfg))
    assert set(got) == set(expected)
    for task, values in expected.items():
        for metric in METRICS:
            if metric in values:
                assert abs(got[task][metric] - values[metric]) <= 0.1, (config, task, metric, got[task][metric],
                                                                        values[metric])
    print(config, {t: round(v.get("AP", v.get("mIoU", -1)), 2) for t, v in got.items()})
