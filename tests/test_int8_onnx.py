"""dev/bench/int8_onnx.py on a tiny case (FCOS R-18 with random weights at 64 px, score threshold 0
so that it detects; three calibration images of a 16-image shapes_train, four validation images):
the int8 file holds QDQ nodes on exactly the float file's constant-weight convolutions, keeps
d2seg's metadata, runs under ONNX Runtime through ONNXModel with the float file's outputs
(names, dtypes, shapes) and scores near float32's, and the calibration inputs are what
ONNXModel feeds."""
import json
import os

import numpy as np
import onnx
import pytest
import torch

from conftest import CONFIGS, TINY_SHAPES, load_script

int8_script = load_script("dev/bench/int8_onnx.py")

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = os.path.join(CONFIGS, "FCOS/fcos_R18_shapes.yaml")
OPTS = list(TINY_SHAPES) + ["MODEL.FCOS.INFERENCE_TH_TEST", "0.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    argv = ["--config-file", CONFIG, "--weights", "", "--calib", "3", "--eval", "--repeats", "1",
            "--output", str(out)] + OPTS
    assert int8_script.main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_int8_file_quantizes_the_convolutions_only(run):
    out, report = run
    f32, i8 = onnx.load(str(out / "float32.onnx")), onnx.load(str(out / "int8.onnx"))
    ops = [n.op_type for n in i8.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    constants = {t.name for t in f32.graph.initializer}
    convs = [n for n in f32.graph.node if n.op_type == "Conv" and n.input[1] in constants]
    assert len(convs) > 20 and report["quantization"]["nodes_quantized"] == len(convs)
    # every convolution of the int8 file takes its weight and input from a DequantizeLinear
    producer = {o: n.op_type for n in i8.graph.node for o in n.output}
    i8_convs = [n for n in i8.graph.node if n.op_type == "Conv"]
    assert len(i8_convs) == len(convs)
    for n in i8_convs:
        assert producer.get(n.input[0]) == producer.get(n.input[1]) == "DequantizeLinear", n.name
    # the post-processing stays float32: NMS and TopK take no dequantized tensor directly
    for n in i8.graph.node:
        if n.op_type in ("NonMaxSuppression", "TopK"):
            assert all(producer.get(x) != "DequantizeLinear" for x in n.input), n.name
    weights = [t for t in i8.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(weights) == len({n.input[1] for n in convs})  # int8 weights (the heads' shared by the levels)
    # every bias int32 (the random towers' equal zero biases, which the exporter merges and passes
    # through Identity nodes, are quantized too)
    biases = [n.input[2] for n in i8_convs if len(n.input) > 2]
    assert biases and all(producer.get(b) == "DequantizeLinear" for b in biases)
    # ONNX Runtime runs every one of them as an int8 convolution (uint8 activations, the default)
    assert report["quantization"]["fused_by_onnxruntime"].get("QLinearConv") == len(convs)
    assert "Conv" not in report["quantization"]["fused_by_onnxruntime"]
    assert report["quantization"]["qdq_nodes"]["QuantizeLinear"] == ops.count("QuantizeLinear")
    assert os.path.getsize(out / "int8.onnx") < 0.5 * os.path.getsize(out / "float32.onnx")


def test_int8_file_runs_with_the_float_outputs(run):
    from d2seg.deploy import ONNXModel, read_metadata

    out, report = run
    meta = read_metadata(str(out / "int8.onnx"))
    assert "QDQ" in meta["d2seg.quantization"] and meta["d2seg.height"] == meta["d2seg.width"] == "64"
    models = {s: ONNXModel(str(out / f"{s}.onnx"), num_threads=1) for s in ("float32", "int8")}
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    res = {s: m.run(image, 64, 64) for s, m in models.items()}
    assert list(res["int8"]) == list(res["float32"]) == ["boxes", "scores", "classes"]
    for name, a in res["float32"].items():
        b = res["int8"][name]
        assert b.dtype == a.dtype and b.ndim == a.ndim and b.shape[1:] == a.shape[1:], name
    n = len(res["int8"]["scores"])
    assert n > 0 and res["int8"]["boxes"].shape == (n, 4) and res["int8"]["classes"].shape == (n,)
    # int8 scores near float32's (a wrong calibration range would move them by far more)
    k = min(n, len(res["float32"]["scores"]))
    a = np.sort(res["float32"]["scores"])[::-1][:k]
    b = np.sort(res["int8"]["scores"])[::-1][:k]
    assert np.abs(a - b).max() < 0.05
    assert report["timing"]["median"]["int8"] > 0 and "detections: float32" in report["timing"]["first_call"]


def test_evaluation_of_both_files(run):
    _, report = run
    ev = report["eval"]
    for side in ("float32", "int8"):
        ap = ev[side]["results"]["bbox"]["AP"]
        assert ap is not None and 0.0 <= ap <= 100.0, side
    assert "--weights '' --calib 3" in report["command"]  # the command as a shell would take it
    assert ev["int8_minus_float32"]["bbox"]["AP"] == pytest.approx(
        ev["int8"]["results"]["bbox"]["AP"] - ev["float32"]["results"]["bbox"]["AP"])


def test_calibration_feeds_are_what_onnxmodel_feeds(run):
    from d2seg.data import prepare_datasets
    from d2seg.engine import Trainer, setup_cfg

    out, _ = run
    cfg = setup_cfg(CONFIG, OPTS + ["MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('shapes_train',)"])
    feeds = int8_script.calibration_feeds(cfg, str(out / "float32.onnx"), "shapes_train", 2)
    assert len(feeds) == 2
    prepare_datasets(cfg)
    first = next(iter(Trainer.build_test_loader(cfg, "shapes_train")))[0]
    assert feeds[0]["images"].dtype == np.float32 and feeds[0]["images"].shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(feeds[0]["images"][0], first["image"].float().numpy())
    assert feeds[0]["output_size"].dtype == np.int64 and list(feeds[0]["output_size"]) == [64, 64]
    with pytest.raises(ValueError, match="has only 16 images"):
        int8_script.calibration_feeds(cfg, str(out / "float32.onnx"), "shapes_train", 17)


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        int8_script.parse_args(["--config-file", CONFIG, "--weights", "", "--output", "x", "--calib", "0"])
    assert int8_script.main(["--config-file", CONFIG, "--weights", str(tmp_path / "missing.pth"), "--output",
                             str(tmp_path / "out")]) == 2
