"""Shared test set-up: data sets are generated into a temporary DETECTRON2_DATASETS (never
into the repository), and tiny training overrides keep every run to seconds."""
import os
import sys
import tempfile

import pytest

# Before d2seg is imported anywhere: where the built-in data sets are generated.
os.environ.setdefault("DETECTRON2_DATASETS", tempfile.mkdtemp(prefix="d2seg-test-datasets-"))
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
CONFIGS = os.path.join(REPO, "configs")

# A tiny version of the common budget: 16 train / 4 val images of 64 px, batch 2.
TINY_SHAPES = [
    "D2SEG.SHAPES.NUM_TRAIN", "16",
    "D2SEG.SHAPES.NUM_VAL", "4",
    "D2SEG.SHAPES.IMAGE_SIZE", "64",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "2",
    "DATALOADER.NUM_WORKERS", "0",
]


def tiny_opts(output_dir, max_iter=10, **extra):
    opts = list(TINY_SHAPES) + ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "()",
                                "OUTPUT_DIR", str(output_dir)]
    for k, v in extra.items():
        opts += [k.replace("__", "."), str(v)]
    return opts


@pytest.fixture(scope="session")
def python():
    return sys.executable
