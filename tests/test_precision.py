"""TEST.PRECISION (d2seg.engine.precision): float32 or bfloat16 autocast at inference.

One tiny FCOS (R-18, 64 px shapes, every score threshold at 0 so that it returns
detections with random weights) is built once; a forward hook on its backbone records
whether autocast was on, and in which dtype, each time the model runs. Then evaluation
(Trainer.test with a real Detectron2 evaluator), d2seg.engine.Predictor (tools/demo.py) and
the benchmark's measurement are checked to run it under bfloat16 autocast exactly when
TEST.PRECISION says so, with float32 results; an unknown value, a CPU without bfloat16
(simulated with D2SEG_CPU_BF16=0) and an ONNX file are clear errors.
"""
import os

import numpy as np
import pytest
import torch
from detectron2.evaluation import DatasetEvaluator

from conftest import CONFIGS, TINY_SHAPES, load_script

FCOS = os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml")


def make_cfg(tmp_path, precision, *extra):
    from d2seg.engine import setup_cfg

    return setup_cfg(FCOS, TINY_SHAPES + ["MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "TEST.PRECISION", precision,
                                          "OUTPUT_DIR", str(tmp_path), *extra])


@pytest.fixture(scope="module")
def fcos(tmp_path_factory):
    """(model, calls): the tiny FCOS in eval mode and the list its backbone hook appends
    (autocast enabled, autocast dtype, dtype of the backbone's output) to on each call."""
    from d2seg.engine import Trainer

    torch.manual_seed(0)
    model = Trainer.build_model(make_cfg(tmp_path_factory.mktemp("fcos"), "float32")).eval()
    calls = []

    def hook(module, inputs, outputs):
        calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                      next(iter(outputs.values())).dtype))

    model.backbone.register_forward_hook(hook)
    return model, calls


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setenv("D2SEG_CPU_BF16", "1")  # run bfloat16 whatever this CPU has


class RecordDtypes(DatasetEvaluator):
    """A Detectron2 evaluator that records the dtypes of the predictions it is given."""

    def reset(self):
        self.dtypes = set()
        self.count = 0

    def process(self, inputs, outputs):
        for out in outputs:
            inst = out["instances"]
            self.count += len(inst)
            self.dtypes |= {("boxes", inst.pred_boxes.tensor.dtype), ("scores", inst.scores.dtype)}

    def evaluate(self):
        return {"dtypes": {"count": self.count}}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_evaluation_honours_precision(fcos, tmp_path, bf16_cpu, precision):
    from d2seg.engine import Trainer

    model, calls = fcos
    calls.clear()
    recorder = RecordDtypes()
    Trainer.test(make_cfg(tmp_path, precision), model, [recorder])
    assert len(calls) == 4  # the 4 tiny validation images, one call each
    if precision == "bfloat16":
        assert set(calls) == {(True, torch.bfloat16, torch.bfloat16)}
    else:
        assert all(not on for on, _, _ in calls) and {c[2] for c in calls} == {torch.float32}
    assert recorder.count > 0
    assert recorder.dtypes == {("boxes", torch.float32), ("scores", torch.float32)}
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the evaluation


def test_predictor_bfloat16_float32_outputs(fcos, tmp_path, bf16_cpu):
    from d2seg.engine import Predictor

    model, calls = fcos
    weights = tmp_path / "fcos.pth"
    torch.save({"model": model.state_dict()}, weights)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    results = {}
    for precision in ("float32", "bfloat16"):
        predictor = Predictor(make_cfg(tmp_path, precision), str(weights))
        assert isinstance(predictor.model, type(model))  # the plain model, float32 parameters
        predictor.model.backbone.register_forward_hook(
            lambda m, i, o: calls.append((torch.is_autocast_enabled("cpu"), None, next(iter(o.values())).dtype)))
        calls.clear()
        inst = predictor(image)["instances"]
        assert calls[-1][0] == (precision == "bfloat16")
        assert calls[-1][2] == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
        assert inst.image_size == (50, 70) and len(inst) > 0
        assert inst.scores.dtype == torch.float32 and inst.pred_boxes.tensor.dtype == torch.float32
        results[precision] = inst
    # the same weights: the best-scoring detection is the same one up to bfloat16 rounding
    top = {p: r.scores.argmax() for p, r in results.items()}
    assert abs(float(results["float32"].scores[top["float32"]]) - float(results["bfloat16"].scores[top["bfloat16"]])) < 0.02


def test_unknown_precision(fcos, tmp_path):
    from d2seg.engine import Trainer, at_precision

    with pytest.raises(ValueError, match=r"TEST.PRECISION: unknown precision 'float16'.*float32, bfloat16"):
        at_precision(make_cfg(tmp_path, "float16"), fcos[0])
    with pytest.raises(ValueError, match="TEST.PRECISION: unknown precision 'fp32'"):
        Trainer.test(make_cfg(tmp_path, "fp32"), fcos[0], [RecordDtypes()])


def test_cpu_without_bf16_is_an_error(fcos, tmp_path, monkeypatch):
    from d2seg.engine import Predictor, Trainer
    from d2seg.engine.precision import cpu_has_bf16

    monkeypatch.setenv("D2SEG_CPU_BF16", "0")
    cfg = make_cfg(tmp_path, "bfloat16")
    message = r"TEST.PRECISION bfloat16: this CPU has no native bfloat16.*avx512_bf16.*D2SEG_CPU_BF16=1"
    with pytest.raises(RuntimeError, match=message):
        Trainer.test(cfg, fcos[0], [RecordDtypes()])
    with pytest.raises(RuntimeError, match=message):
        Predictor(cfg)
    Predictor(make_cfg(tmp_path, "float32"))  # float32 needs nothing
    # the detection itself, on /proc/cpuinfo-style files
    monkeypatch.delenv("D2SEG_CPU_BF16")
    (tmp_path / "old").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    (tmp_path / "new").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert not cpu_has_bf16(str(tmp_path / "old"))
    assert cpu_has_bf16(str(tmp_path / "new"))
    monkeypatch.setenv("D2SEG_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="D2SEG_CPU_BF16='yes': expected 0 or 1"):
        cpu_has_bf16()


class DeterminantHead(torch.nn.Module):
    """A linear layer (bfloat16 under autocast) followed by a determinant, whose LU
    factorisation has no bfloat16 CPU kernel (and that autocast does not cast)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.det(self.linear(x))


def test_op_without_bf16_kernel_names_the_key(tmp_path, bf16_cpu):
    from d2seg.engine import at_precision

    run = at_precision(make_cfg(tmp_path, "bfloat16"), DeterminantHead())
    with pytest.raises(NotImplementedError) as info:
        run(torch.randn(8, 8))
    assert "TEST.PRECISION bfloat16 under torch.autocast('cpu')" in "\n".join(info.value.__notes__)
    assert at_precision(make_cfg(tmp_path, "float32"), DeterminantHead())(torch.randn(8, 8)).dtype == torch.float32


def test_onnx_refuses_bfloat16(tmp_path):
    from d2seg.deploy import ONNXModel, ONNXPredictor

    cfg = make_cfg(tmp_path, "bfloat16")
    for cls in (ONNXModel, ONNXPredictor):
        # refused from the config alone, before the file is read
        with pytest.raises(ValueError, match=r"TEST.PRECISION bfloat16: .*model.onnx is an ONNX file, which runs in "
                                             r"float32 only"):
            cls(str(tmp_path / "model.onnx"), cfg)


def test_benchmark_measures_at_precision(tmp_path, bf16_cpu, monkeypatch):
    from d2seg.benchmark.measure import measure_inference

    result = measure_inference(make_cfg(tmp_path, "bfloat16"), warmup=0, repeats=1)
    assert result["precision"] == "bfloat16" and result["detections"] > 0
    monkeypatch.setenv("D2SEG_CPU_BF16", "0")
    with pytest.raises(RuntimeError, match="TEST.PRECISION bfloat16: this CPU has no native bfloat16"):
        measure_inference(make_cfg(tmp_path, "bfloat16"), warmup=0, repeats=1)


def test_demo_bfloat16(tmp_path, bf16_cpu):
    from PIL import Image

    demo = load_script("tools/demo.py")
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out.png"
    opts = ["--opts"] + TINY_SHAPES + ["MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "TEST.PRECISION", "bfloat16"]
    assert demo.main(["--config-file", FCOS, "--input", str(src), "--output", str(out),
                      "--confidence-threshold", "0"] + opts) == 0
    assert Image.open(out).size == (64, 64)


SHAPES_SCORE_LAYERS = {  # the per-candidate score layers; dense score maps (FCOS, RetinaNet, SOLO) have none
    "quick/mask_rcnn_shapes.yaml": ["roi_heads.box_predictor.cls_score"],  # Detectron2's Mask R-CNN
    "PointRend/pointrend_rcnn_R18_shapes.yaml": ["roi_heads.box_predictor.cls_score"],
    "SparseInst/sparse_inst_r18_giam_shapes.yaml": ["decoder.inst_branch.cls_score",
                                                    "decoder.inst_branch.objectness"],
    "PointRend/pointrend_sparseinst_r18_giam_loc_shapes.yaml": ["decoder.inst_branch.cls_score",
                                                                "decoder.inst_branch.objectness"],
    "FCOS/fcos_R18_shapes.yaml": [],
    "FCOS/retinanet_shapes.yaml": [],
    "SOLO/solov2_shapes.yaml": [],
    "quick/semantic_fpn_shapes.yaml": [],
}


@pytest.mark.parametrize("config", sorted(SHAPES_SCORE_LAYERS))
def test_score_layers_of_each_method(config):
    from d2seg.engine import Trainer, setup_cfg
    from d2seg.engine.precision import score_layers

    model = Trainer.build_model(setup_cfg(os.path.join(CONFIGS, config), TINY_SHAPES))
    assert score_layers(model) == SHAPES_SCORE_LAYERS[config]


@pytest.mark.parametrize("keep", [True, False])
def test_score_layers_run_in_float32_under_bfloat16(bf16_cpu, keep):
    """TEST.FLOAT32_SCORES (default True): the class logits of Detectron2's box predictor are
    computed in float32 inside Mask R-CNN's bfloat16 forward, its box deltas in bfloat16; the
    model is unchanged afterwards (float32 when called directly)."""
    from d2seg.engine import Trainer, at_precision, setup_cfg

    cfg = setup_cfg(os.path.join(CONFIGS, "quick", "mask_rcnn_shapes.yaml"),
                    TINY_SHAPES + ["TEST.PRECISION", "bfloat16", "TEST.FLOAT32_SCORES", str(keep)])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    predictor = model.roi_heads.box_predictor
    seen = []
    for name in ("cls_score", "bbox_pred"):
        getattr(predictor, name).register_forward_hook(lambda m, i, o, name=name: seen.append((name, o.dtype)))
    image = {"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}
    with torch.no_grad():
        out = at_precision(cfg, model)([image])[0]["instances"]
        assert out.scores.dtype == torch.float32
        kept = torch.float32 if keep else torch.bfloat16
        assert dict(seen) == {"cls_score": kept, "bbox_pred": torch.bfloat16}
        assert "forward" not in vars(predictor.cls_score)
        seen.clear()
        model([image])
    assert dict(seen) == {"cls_score": torch.float32, "bbox_pred": torch.float32}


def test_float32_modules_restores_forward_after_an_error():
    from d2seg.engine.precision import float32_modules

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.autocast("cpu", dtype=torch.bfloat16), float32_modules(model, ["1"]):
            assert model(x).dtype == torch.float32 and model[0](x).dtype == torch.bfloat16
            raise RuntimeError("boom")
    assert "forward" not in vars(model[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16


def test_float32_modules_keeps_a_forward_patched_before_and_names_unknown_modules():
    from d2seg.engine.precision import float32_modules

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    theirs = model[0].forward = lambda x: torch.zeros(1)  # someone else's patch
    with torch.autocast("cpu", dtype=torch.bfloat16), float32_modules(model, ["0"]):
        assert model(torch.randn(3, 4)).dtype == torch.float32
    assert model[0].forward is theirs
    with pytest.raises(KeyError, match="no module named 1"):
        float32_modules(model, ["1"])
