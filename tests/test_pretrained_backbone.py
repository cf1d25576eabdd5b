"""The shapes-pretrained backbone (d2seg.data.pretrained, tools/pretrain_backbone.py):
the tool end to end at a tiny size, the cache behind ``d2seg://shapes/...``, and the
checkpoint loading into every shapes config with only the backbone keys."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO

TINY = ["--num-images", "24", "--num-held-out", "8", "--iters", "3", "--batch-size", "8",
        "--crop-size", "32"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "r18.pth"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "pretrain_backbone.py"),
                           "--output", str(out)] + TINY,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stderr + proc.stdout
    return out


def test_tool_writes_a_detectron2_checkpoint_with_its_accuracy(tiny_checkpoint):
    data = torch.load(tiny_checkpoint, weights_only=True)
    assert data["matching_heuristics"] is True
    keys = set(data["model"])
    # The bare ResNet-18: stem + 4 stages x 2 blocks, GN; no FPN, no classifier.
    assert "stem.conv1.weight" in keys and "res5.1.conv2.norm.bias" in keys
    assert "res3.0.shortcut.weight" in keys
    assert not any(k.startswith(("linear", "fpn", "backbone.")) for k in keys)
    assert data["model"]["stem.conv1.weight"].shape == (64, 3, 7, 7)
    stats = json.load(open(os.path.splitext(tiny_checkpoint)[0] + ".json"))["stats"]
    assert 0.0 <= stats["held_out_accuracy"] <= 1.0
    assert stats["num_held_out_crops"] == 8 + 0 * stats["num_train_crops"]
    assert stats["num_train_crops"] > 8


def test_crops_hold_one_shape_each():
    from d2seg.data.pretrained import PretrainRecipe, make_crops
    from d2seg.data.shapes import render_image

    recipe = PretrainRecipe(num_images=3, num_held_out=2, crop_size=32)
    crops, labels = make_crops(recipe)
    expected = [inst.category for i in range(3) for inst in render_image(1000, i, 128)[1]]
    assert labels.tolist() == expected
    assert crops.shape == (len(expected), 32, 32, 3) and crops.dtype == np.uint8
    # Deterministic from the recipe.
    again, _ = make_crops(recipe)
    assert np.array_equal(crops, again)


def test_cache_makes_once_and_names_unknown_backbones(tmp_path, monkeypatch):
    from d2seg.data import pretrained

    recipe = pretrained.PretrainRecipe(num_images=12, num_held_out=4, iters=2, batch_size=4, crop_size=32)
    monkeypatch.setitem(pretrained.RECIPES, "tiny-test", recipe)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.setenv("D2SEG_PRETRAIN_ON_FIRST_USE", "0")  # the test suite's setting: no implicit pretraining
    with pytest.raises(RuntimeError, match="not cached.*pretrain_backbone.py.*MODEL.WEIGHTS"):
        pretrained.resolve_pretrained("d2seg://shapes/tiny-test")
    assert not os.path.exists(pretrained.cached_path("tiny-test"))
    monkeypatch.setenv("D2SEG_PRETRAIN_ON_FIRST_USE", "1")
    path = pretrained.resolve_pretrained("d2seg://shapes/tiny-test")
    assert path.startswith(str(tmp_path)) and os.path.isfile(path)
    assert recipe.digest() in path
    mtime = os.path.getmtime(path)
    assert pretrained.resolve_pretrained("shapes/tiny-test") == path
    assert os.path.getmtime(path) == mtime  # cached, not made again
    monkeypatch.setenv("D2SEG_PRETRAIN_ON_FIRST_USE", "0")
    assert pretrained.resolve_pretrained("shapes/tiny-test") == path  # a cached one loads either way
    with pytest.raises(KeyError, match="R18-GN-pretrained"):
        pretrained.resolve_pretrained("shapes/R99")


SHAPES_CONFIGS = sorted(glob.glob(os.path.join(CONFIGS, "*", "*shapes*.yaml")))


def test_every_shapes_config_is_covered():
    assert len(SHAPES_CONFIGS) >= 18


@pytest.mark.parametrize("config", SHAPES_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_checkpoint_loads_only_the_backbone(config, tiny_checkpoint, tmp_path):
    from detectron2.modeling import build_model

    from d2seg.engine.checkpoint import AtomicCheckpointer
    from d2seg.engine.trainer import setup_cfg

    cfg = setup_cfg(config, ["OUTPUT_DIR", str(tmp_path)], follow_dataset_classes=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    AtomicCheckpointer(model).load(str(tiny_checkpoint))
    after = model.state_dict()
    ckpt = torch.load(tiny_checkpoint, weights_only=True)["model"]
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    # Every ResNet tensor is loaded (under backbone.bottom_up. or backbone.), nothing else.
    loaded = {}
    for k in after:
        for prefix in ("backbone.bottom_up.", "backbone."):
            if k.startswith(prefix) and k[len(prefix):] in ckpt:
                loaded[k] = k[len(prefix):]
                break
    assert len(loaded) == len(ckpt), sorted(set(ckpt) - set(loaded.values()))[:5]
    for k, src in loaded.items():
        assert torch.equal(after[k], ckpt[src]), k
    assert changed <= set(loaded), sorted(changed - set(loaded))[:5]


@pytest.mark.parametrize("config", SHAPES_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_shapes_configs_start_from_the_pretrained_backbone(config):
    """The common budget's default (issue 28): every shapes config starts from the shapes-pretrained
    backbone; from scratch is the documented override MODEL.WEIGHTS ""."""
    from d2seg.engine.trainer import setup_cfg

    assert setup_cfg(config, follow_dataset_classes=False).MODEL.WEIGHTS == "d2seg://shapes/R18-GN-pretrained"
    assert setup_cfg(config, ["MODEL.WEIGHTS", ""], follow_dataset_classes=False).MODEL.WEIGHTS == ""


def test_training_without_the_cached_backbone_says_how(tmp_path, monkeypatch):
    """With D2SEG_PRETRAIN_ON_FIRST_USE=0 and nothing cached, train_net.py stops at once with the
    two ways out, instead of pretraining for 15 minutes."""
    import subprocess
    import sys

    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), D2SEG_PRETRAIN_ON_FIRST_USE="0",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(CONFIGS, "..", "tools", "train_net.py"), "--config-file",
           os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml"), "D2SEG.SHAPES.NUM_TRAIN", "4",
           "D2SEG.SHAPES.NUM_VAL", "2", "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0
    assert "R18-GN-pretrained is not cached" in res.stderr and 'MODEL.WEIGHTS ""' in res.stderr, res.stderr[-3000:]
    assert not os.path.exists(tmp_path / "datasets" / "shapes_pretrained")
