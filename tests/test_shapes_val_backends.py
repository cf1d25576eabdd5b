"""dev/bench/shapes_val_backends.py end to end on a tiny case (FCOS with random weights, a
constant box of 1.5 strides per side at every location and the score threshold at 0, so that
some boxes match: float32 AP50 6.2; four 64 px validation images): results.json holds the three
backends' COCO results, ONNX Runtime's AP equals float32's within 0.1, the differences are
those of the values, and the markdown row says so; a model without a graph is "no graph"."""
import json
import math
import os

import pytest
import torch

from conftest import CONFIGS, TINY_SHAPES, load_script

backends_script = load_script("dev/bench/shapes_val_backends.py")

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_checkpoint(config, opts, path, fcos=True):
    from d2seg.engine import Trainer, setup_cfg

    torch.manual_seed(0)
    model = Trainer.build_model(setup_cfg(config, opts + ["MODEL.DEVICE", "cpu"]))
    if fcos:
        with torch.no_grad():  # every location: l = t = r = b = 1.5 strides
            model.proposal_generator.fcos_head.bbox_pred.weight.zero_()
            model.proposal_generator.fcos_head.bbox_pred.bias.fill_(1.5)
    torch.save({"model": model.state_dict()}, path)


def test_three_backends_on_a_tiny_fcos(tmp_path, monkeypatch):
    monkeypatch.setenv("D2SEG_CPU_BF16", "1")  # bfloat16 runs (emulated) on a CPU without it too
    config = os.path.join(CONFIGS, "FCOS/fcos_R18_shapes.yaml")
    # score threshold 0: the random model returns detections, so every AP is a number
    opts = list(TINY_SHAPES) + ["MODEL.FCOS.INFERENCE_TH_TEST", "0.0"]
    weights = str(tmp_path / "model.pth")
    _random_checkpoint(config, opts, weights)
    out = tmp_path / "out"
    assert backends_script.main(["--config-file", config, "--weights", weights, "--output", str(out)] + opts) == 0

    report = json.loads((out / "results.json").read_text())
    assert report["config"] == "FCOS/fcos_R18_shapes.yaml"
    assert set(report["backends"]) == {"float32", "bfloat16", "onnxruntime"}
    for name, run in report["backends"].items():
        assert run["status"] == "ok", (name, run)
        assert set(run["results"]) == {"bbox"}, name
        for metric in ("AP", "AP50", "AP75"):
            value = run["results"]["bbox"][metric]
            assert value is not None and 0.0 <= value <= 100.0, (name, metric, value)
        assert (out / name / "inference" / "coco_instances_results.json").is_file(), name
    onnx = report["backends"]["onnxruntime"]
    assert onnx["export"] == "dynamic" and (out / "model.onnx").is_file()
    f32 = report["backends"]["float32"]["results"]["bbox"]
    assert f32["AP50"] > 1.0, f32  # detections that match: the comparison below is not 0 == 0
    for metric in ("AP", "AP50", "AP75"):
        assert abs(onnx["results"]["bbox"][metric] - f32[metric]) <= 0.1, metric

    s = report["summary"]["bbox"]
    assert s["float32"] == f32["AP"]
    assert math.isclose(s["bf16-f32"], s["bfloat16"] - s["float32"], abs_tol=1e-9)
    assert math.isclose(s["ort-f32"], s["onnxruntime"] - s["float32"], abs_tol=1e-9)
    row = report["markdown"][0]
    assert row.startswith("| `FCOS/fcos_R18_shapes.yaml` | box AP | " + f"{s['float32']:.2f} |"), row
    assert row.count("|") == 8 and f"| {s['onnxruntime']:.2f} |" in row, row


def test_rows_for_a_model_without_graph_and_a_failed_backend():
    results = {"bbox": {"AP": 40.0}, "segm": {"AP": 30.5}}
    rows = backends_script.summarise("X/y.yaml", {
        "float32": {"status": "ok", "results": results},
        "bfloat16": {"status": "ok", "results": {"bbox": {"AP": 40.25}, "segm": {"AP": float("nan")}}},
        "onnxruntime": {"status": "no graph", "error": "cannot export"},
    })
    summary, rows = rows
    assert summary["bbox"]["bf16-f32"] == pytest.approx(0.25) and summary["bbox"]["ort-f32"] is None
    assert summary["segm"]["bf16-f32"] is None
    assert rows == ["| `X/y.yaml` | box AP | 40.00 | 40.25 | no graph | +0.25 | - |",
                    "| `X/y.yaml` | mask AP | 30.50 | nan | no graph | - | - |"]
    # semantic: mIoU; a backend that was not asked for
    summary, rows = backends_script.summarise("s.yaml", {"float32": {"status": "ok",
                                                                     "results": {"sem_seg": {"mIoU": 80.0}}}})
    assert rows == ["| `s.yaml` | mIoU | 80.00 | not run | not run | - | - |"]


def test_a_model_without_graph_is_no_graph(tmp_path):
    """Detectron2's plain RetinaNet has no export graph: its ONNX Runtime column says so, and the
    script still succeeds (overrides after --backends stay overrides)."""
    config = os.path.join(CONFIGS, "FCOS/retinanet_shapes.yaml")
    weights = str(tmp_path / "model.pth")
    _random_checkpoint(config, list(TINY_SHAPES), weights, fcos=False)
    out = tmp_path / "out"
    argv = ["--config-file", config, "--weights", weights, "--output", str(out), "--backends", "onnxruntime"]
    assert backends_script.main(argv + list(TINY_SHAPES)) == 0
    report = json.loads((out / "results.json").read_text())
    assert list(report["backends"]) == ["onnxruntime"]
    run = report["backends"]["onnxruntime"]
    assert run["status"] == "no graph" and "RetinaNet" in run["error"], run
    assert report["opts"] == list(TINY_SHAPES) and not (out / "model.onnx").exists()
    assert report["source"] is None or len(report["source"]["head"]) >= 7  # the code that ran
    with pytest.raises(SystemExit):
        backends_script.parse_args(argv[:-1] + ["float32,onnx"])
