"""dev/diagnose/checkpoint_ap.py: which checkpoints it evaluates, in which order, and an end-to-end
run on a tiny shapes model with real checkpoint files and Detectron2's COCO evaluation."""
import json
import math
import os

import pytest
import torch

import d2seg  # noqa: F401
from d2seg.engine import Trainer, setup_cfg

from conftest import REPO, load_script, tiny_opts

tool = load_script("dev/diagnose/checkpoint_ap.py")
CONFIG = os.path.join(REPO, "configs/FCOS/fcos_R18_shapes.yaml")


def save(path, model, iteration):
    torch.save({"model": model.state_dict(), "iteration": iteration}, path)


def test_folder_order_and_final_duplicate(tmp_path):
    w = {"model": {}, "iteration": 0}
    for name, it in (("model_0000999.pth", 999), ("model_0000499.pth", 499), ("model_0001499.pth", 1499),
                     ("model_final.pth", 1499)):
        torch.save({**w, "iteration": it}, tmp_path / name)
    files = [os.path.basename(f) for f in tool.checkpoint_files([str(tmp_path)])]
    # training order; the last periodic checkpoint is the final one's weights again: evaluated once
    assert files == ["model_0000499.pth", "model_0000999.pth", "model_final.pth"]
    assert [tool.iteration_of(str(tmp_path / f)) for f in files] == [500, 1000, 1500]
    torch.save({**w, "iteration": 1999}, tmp_path / "model_final.pth")
    assert len(tool.checkpoint_files([str(tmp_path)])) == 4
    with pytest.raises(FileNotFoundError, match="no model_"):
        tool.checkpoint_files([str(tmp_path / "..")])
    with pytest.raises(FileNotFoundError, match="nothere"):
        tool.checkpoint_files([str(tmp_path / "nothere.pth")])


def test_evaluates_each_checkpoint(tmp_path, capsys):
    opts = tiny_opts(tmp_path / "out")
    cfg = setup_cfg(CONFIG, opts + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    bias = model.proposal_generator.fcos_head.cls_logits.bias
    with torch.no_grad():  # every location scores ~1: detections to evaluate
        bias.fill_(5.0)
    save(tmp_path / "model_0000004.pth", model, 4)
    with torch.no_grad():  # a second checkpoint in which no detection passes the score threshold
        bias.fill_(-20.0)
    save(tmp_path / "other.pth", model, 9)
    out = tmp_path / "rows.json"
    rows = tool.main(["--config-file", CONFIG, "--checkpoints", str(tmp_path / "model_0000004.pth"),
                      str(tmp_path / "other.pth"), "--output", str(out)] + opts)
    assert [r["iteration"] for r in rows] == [5, 10]
    first, second = (r["metrics"] for r in rows)
    assert set(first) == set(second) == {("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75")}
    # each checkpoint is loaded: the first gives numbers, the second nothing to evaluate (NaN)
    assert all(0.0 <= v <= 100.0 for v in first.values())
    assert all(math.isnan(v) for v in second.values())
    table = capsys.readouterr().out
    assert "| model_0000004.pth | 5 | " in table and "| other.pth | 10 | nan |" in table
    saved = json.loads(out.read_text())
    assert saved[0]["metrics"]["bbox/AP50"] == first[("bbox", "AP50")]
