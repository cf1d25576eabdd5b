"""d2seg.deploy around the graphs: the export tool (fixed and dynamic sizes), the evaluation of an
exported file with Detectron2's evaluator (the same mIoU as the PyTorch model), and the clear
errors: a module without an ONNX export, a file from another model, another opset, a file
without d2seg's metadata."""
import importlib.util
import os
import shutil

import onnx
import onnxruntime as ort
import pytest
import torch

import d2seg  # noqa: F401
from d2seg.deploy import ExportError, ONNXModel, check_exportable, config_digest, read_metadata
from d2seg.engine import Trainer, setup_cfg

from conftest import CONFIGS, TOOLS, tiny_opts

pytestmark = pytest.mark.usefixtures("one_thread")

SEMANTIC = os.path.join(CONFIGS, "quick", "semantic_fpn_shapes.yaml")
FCOS = os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A semantic FPN on the tiny shapes data, its weights saved, exported by the tool at a
    fixed 64 x 64: (cfg, model, path)."""
    d = tmp_path_factory.mktemp("deploy_tools")
    opts = tiny_opts(d)
    cfg = setup_cfg(SEMANTIC, opts + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    weights = os.path.join(d, "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    path = os.path.join(d, "semantic.onnx")
    rc = load_tool("export_model").main(["--config-file", SEMANTIC, "--output", path, "--height", "64",
                                         "--width", "64"] + opts + ["MODEL.WEIGHTS", weights])
    assert rc == 0
    return cfg, model, path


def test_export_tool_writes_metadata_and_fixed_size(exported):
    cfg, _, path = exported
    meta = read_metadata(path)
    assert meta["d2seg.method"] == "SemanticSegmentor"
    assert meta["d2seg.config_digest"] == config_digest(cfg)
    assert meta["d2seg.input_format"] == "BGR" and meta["d2seg.opset"] == "17"
    assert meta["d2seg.dynamic"] == "0" and meta["d2seg.size_divisibility"] == "32"
    images = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert images.name == "images" and images.shape == [1, 3, 64, 64]


def test_eval_onnx_gives_pytorch_miou(exported):
    """tools/eval_onnx.py: SemSegEvaluator on the exported file = on the PyTorch model."""
    cfg, model, path = exported
    onnx_results = load_tool("eval_onnx").evaluate(path)
    torch_results = Trainer.test(cfg, model)
    assert set(onnx_results["sem_seg"]) == set(torch_results["sem_seg"])
    for k in ("mIoU", "fwIoU", "pACC"):
        assert abs(onnx_results["sem_seg"][k] - torch_results["sem_seg"][k]) < 0.1, k


def test_file_from_another_model_is_refused(exported):
    _, _, path = exported
    other = setup_cfg(FCOS, ["MODEL.DEVICE", "cpu"], follow_dataset_classes=False)
    with pytest.raises(ValueError, match="exported from another model.*SemanticSegmentor.*OneStageDetector"):
        ONNXModel(path, other)


def test_other_opset_and_foreign_file_are_refused(exported, tmp_path):
    _, _, path = exported
    proto = onnx.load(path)
    proto.opset_import[0].version = 18  # converted after export
    converted = os.path.join(tmp_path, "converted.onnx")
    onnx.save(proto, converted)
    with pytest.raises(ValueError, match="opset 18 but was exported with opset 17"):
        ONNXModel(converted)
    del proto.metadata_props[:]
    foreign = os.path.join(tmp_path, "foreign.onnx")
    onnx.save(proto, foreign)
    with pytest.raises(ValueError, match="no d2seg metadata"):
        ONNXModel(foreign)
    shutil.copy(path, os.path.join(tmp_path, "copy.onnx"))  # the original still loads
    assert ONNXModel(os.path.join(tmp_path, "copy.onnx")).kind == "sem_seg"


def test_deformable_conv_is_refused_by_name():
    cfg = setup_cfg(FCOS, ["MODEL.DEVICE", "cpu", "MODEL.FCOS.USE_DEFORMABLE", "True"], follow_dataset_classes=False)
    model = Trainer.build_model(cfg)
    with pytest.raises(ExportError, match=r"'proposal_generator\.fcos_head\.cls_tower\.\d+' \(ModulatedDeformConv2d\)"):
        check_exportable(model)


def test_export_tool_rejects_half_a_size(capsys):
    assert load_tool("export_model").main(["--config-file", FCOS, "--output", "x.onnx", "--height", "64"]) == 2
    assert "both --height and --width" in capsys.readouterr().err


def test_demo_draws_with_the_onnx_file(exported, tmp_path):
    """tools/demo.py --onnx: ONNXPredictor behind the demo (a semantic map drawn)."""
    from PIL import Image

    cfg, _, path = exported
    image = os.path.join(tmp_path, "in.png")
    Image.fromarray((torch.rand(50, 70, 3) * 255).byte().numpy()).save(image)
    out = os.path.join(tmp_path, "out.png")
    opts = tiny_opts(tmp_path)
    rc = load_tool("demo").main(["--config-file", SEMANTIC, "--input", image, "--output", out, "--onnx", path,
                                 "--opts"] + opts)
    assert rc == 0
    assert Image.open(out).size == (70, 50)


def test_export_tool_benchmark_times_both_runtimes(exported):
    """tools/export_model.py --benchmark: median seconds of PyTorch and of ONNX Runtime, one
    thread each; the caller's thread count is restored."""
    cfg, model, path = exported
    threads = torch.get_num_threads()
    t_torch, t_ort = load_tool("export_model").benchmark(model, path, cfg, 64, 64, runs=2)
    assert 0 < t_torch < 60 and 0 < t_ort < 60
    assert torch.get_num_threads() == threads
