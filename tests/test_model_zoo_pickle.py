"""Detectron2 .pkl checkpoints are read by d2seg's restricted unpickler, with no opt-in and
no code execution: Detectron2-style and Caffe2-style pickles of numpy arrays load (also
through the checkpointer, into a real model, and through tools/convert_checkpoint.py); a
pickle whose ``__reduce__`` would run a command is refused, naming the file and the global,
and the command does not run."""
import collections
import fractions
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import d2seg  # noqa: F401
from d2seg.engine.checkpoint import AtomicCheckpointer
from d2seg.model_zoo import UnsafeCheckpointError, get_config, load_checkpoint_file, load_pickle_restricted
from detectron2.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _RunsACommand:
    """Unpickling this runs ``touch <marker>`` (if the unpickler lets it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def no_opt_in(monkeypatch):
    monkeypatch.delenv("D2SEG_ALLOW_PICKLE", raising=False)


@pytest.fixture(scope="module")
def model():
    cfg = get_config("FCOS/fcos_R18_shapes.yaml")
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


def _dump(obj, path, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_detectron2_style_pickle_loads(tmp_path, protocol):
    """What Detectron2's model zoo .pkl holds: {"model": {name: ndarray}, "__author__": ...},
    arrays of several dtypes, numpy scalars, an OrderedDict, bytes."""
    arrays = collections.OrderedDict(
        [("backbone.stem.conv1.weight", np.random.RandomState(0).randn(8, 3, 7, 7).astype(np.float32)),
         ("roi_heads.box_predictor.cls_score.bias", np.arange(5, dtype=np.float64)),
         ("proposal_generator.anchor_generator.cell_anchors.0", np.zeros((3, 4), np.float16)),
         ("step", np.int64(7)), ("lr", np.float32(0.02))])
    obj = {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True, "blob": b"\x00\xff"}
    loaded = load_pickle_restricted(_dump(obj, tmp_path / "model_final.pkl", protocol))
    assert set(loaded) == set(obj) and loaded["__author__"] == "Detectron2 Model Zoo" and loaded["blob"] == b"\x00\xff"
    assert isinstance(loaded["model"], collections.OrderedDict) and list(loaded["model"]) == list(arrays)
    for k, v in arrays.items():
        assert loaded["model"][k].dtype == v.dtype and np.array_equal(loaded["model"][k], v), k


def test_command_in_reduce_is_refused_and_does_not_run(tmp_path, model):
    marker = tmp_path / "pwned"
    evil = {"model": {"w": np.ones(3, np.float32)}, "__author__": "x", "payload": _RunsACommand(marker)}
    path = _dump(evil, tmp_path / "evil.pkl", 2)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_file(path)
    msg = str(err.value)
    assert path in msg and f"the global {os.system.__module__}.system" in msg and "D2SEG_ALLOW_PICKLE=1" in msg
    with pytest.raises(UnsafeCheckpointError, match="evil.pkl"):
        AtomicCheckpointer(model).load(path)
    assert not marker.exists()
    # the marker really is what the payload makes when a plain pickle.load runs it
    # (in a child process, so this test process never unpickles it)
    code = f"import pickle; pickle.load(open({path!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    assert marker.exists()


def test_a_file_needing_more_needs_the_opt_in(tmp_path, monkeypatch):
    path = _dump({"model": {}, "ratio": fractions.Fraction(1, 3)}, tmp_path / "fraction.pkl", 2)
    with pytest.raises(UnsafeCheckpointError, match="fractions.Fraction"):
        load_checkpoint_file(path)
    monkeypatch.setenv("D2SEG_ALLOW_PICKLE", "1")
    assert load_checkpoint_file(path)["ratio"] == fractions.Fraction(1, 3)


def test_checkpointer_loads_detectron2_and_caffe2_pickles_without_opt_in(tmp_path, model):
    """A Detectron2 model-zoo .pkl of the whole model, and a Caffe2 ImageNet-style .pkl
    (``detectron2://ImageNetPretrained/MSRA/R-50.pkl`` layout: C2 names, ``*_momentum``
    blobs), both as numpy arrays, load into a real model with no environment variable."""
    state = {k: v.numpy() + 1.0 if v.is_floating_point() else v.numpy() for k, v in model.state_dict().items()}
    d2 = _dump({"model": state, "__author__": "Detectron2 Model Zoo"}, tmp_path / "model_final.pkl", 2)
    AtomicCheckpointer(model).load(d2)
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), state[k]), k

    conv1 = np.random.RandomState(1).randn(*model.backbone.bottom_up.stem.conv1.weight.shape).astype(np.float32)
    c2 = {"conv1_w": conv1, "conv1_w_momentum": np.zeros_like(conv1)}
    AtomicCheckpointer(model).load(_dump(c2, tmp_path / "R-18.pkl", 2))
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, torch.from_numpy(conv1))


def test_convert_checkpoint_cli_reads_pickles_of_arrays_and_refuses_code(tmp_path, model):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    good = _dump({"model": state, "__author__": "Detectron2 Model Zoo"}, tmp_path / "good.pkl", 2)
    args = ["--config-file", "FCOS/fcos_R18_shapes.yaml"]
    assert convert_checkpoint.main(args + [good, str(tmp_path / "good.pth")]) == 0
    assert torch.load(tmp_path / "good.pth", weights_only=True)["model"].keys() == state.keys()
    marker = tmp_path / "pwned"
    evil = _dump({"model": state, "x": _RunsACommand(marker)}, tmp_path / "evil.pkl", 2)
    assert convert_checkpoint.main(args + [evil, str(tmp_path / "evil.pth")]) == 1
    assert not (tmp_path / "evil.pth").exists() and not marker.exists()
