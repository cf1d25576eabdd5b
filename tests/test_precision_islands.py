"""dev/diagnose/precision_islands.py on a real checkpoint file and the tiny shapes sets: the
float32 row is float32's AP, a module kept in float32 is evaluated, and a module name the model
does not have is refused before anything runs."""
import json

import torch

from conftest import CONFIGS, TINY_SHAPES, load_script

tool = load_script("dev/diagnose/precision_islands.py")
CONFIG = f"{CONFIGS}/SparseInst/sparse_inst_r18_giam_shapes.yaml"


def test_islands_rows_and_unknown_module(tmp_path, monkeypatch, capsys):
    import d2seg  # noqa: F401
    from d2seg.engine import Trainer, setup_cfg

    monkeypatch.setenv("D2SEG_CPU_BF16", "1")
    opts = [o for o in TINY_SHAPES if o not in ("MODEL.WEIGHTS", "")] + ["MODEL.SPARSE_INST.CLS_THRESHOLD", "0.0",
                                                                          "TEST.FLOAT32_SCORES", "False"]
    torch.manual_seed(0)
    model = Trainer.build_model(setup_cfg(CONFIG, opts))
    ckpt = str(tmp_path / "init.pth")
    torch.save({"model": model.state_dict()}, ckpt)
    base = ["--config-file", CONFIG, "--weights", ckpt, "--output", str(tmp_path / "out")]

    assert tool.main(base + ["--islands", "decoder.no_such_layer"] + opts) == 2
    assert "no module named decoder.no_such_layer" in capsys.readouterr().err

    assert tool.main(base + ["--islands", "decoder.inst_branch.cls_score",
                             "--islands", "decoder.inst_branch.cls_score:out"] + opts) == 0
    report = json.load(open(tmp_path / "out" / "islands.json"))
    runs = [r["run"] for r in report["runs"]]
    assert runs == ["float32", "bfloat16", "bf16, float32: decoder.inst_branch.cls_score",
                    "bf16, float32: decoder.inst_branch.cls_score:out"]
    for r in report["runs"]:
        assert set(r["metrics"]) == {"bbox", "segm"} and "AP" in r["metrics"]["segm"]
    out = capsys.readouterr().out
    assert "| float32 |" in out and "| bfloat16 |" in out
