"""What the reference-parity tests (tests/test_parity_*.py) share: where the fixtures are,
how one is loaded, and its inputs as a Detectron2 batch."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "reference")
sys.path.insert(0, os.path.join(ROOT, "tools"))


def load_fixture(name):
    path = os.path.join(DATA, name)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: run tools/reference_fixtures.py")
    return torch.load(path, weights_only=False)


def batch(fx):
    from reference_fixtures import to_detectron2_inputs
    return to_detectron2_inputs(fx["inputs"])
