"""What the reference-parity tests (tests/test_parity_*.py) share: where the fixtures are,
how one is loaded, and its inputs as a Detectron2 batch."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "reference")
sys.path.insert(0, os.path.join(ROOT, "dev", "reference"))  # the fixture builders


def load_fixture(name):
    path = os.path.join(DATA, name)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: run dev/reference/reference_fixtures.py")
    return torch.load(path, weights_only=False)


def batch(fx):
    from reference_fixtures import to_detectron2_inputs
    return to_detectron2_inputs(fx["inputs"])


def converted_model(fx, source, extra_opts=()):
    """(cfg, model): d2seg's model built from the fixture's shipped config and width overrides
    (plus ``extra_opts``), with the reference's weights converted by d2seg's own converter
    (``source``) and loaded strictly; every key must match in name and shape."""
    from detectron2.modeling import build_model

    from d2seg.engine import setup_cfg
    from d2seg.model_zoo import convert_state_dict
    from d2seg.model_zoo.converters import compare_with_model

    opts = [str(x) for x in fx["d2seg_opts"]] + list(extra_opts)
    cfg = setup_cfg(os.path.join(ROOT, fx["d2seg_config"]), opts, freeze=False)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    result = convert_state_dict({"model": fx["weights"]}, source=source, target_keys=model.state_dict().keys())
    missing, unexpected, shapes = compare_with_model(result.state_dict, model.state_dict())
    assert not (missing or unexpected or shapes), (missing, unexpected, shapes)
    model.load_state_dict(result.state_dict, strict=True)
    return cfg, model
