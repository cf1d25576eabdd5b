"""Shared test set-up: data sets are generated into a temporary DETECTRON2_DATASETS (never
into the repository), and tiny training overrides keep every run to seconds."""
import logging
import os
import sys
import tempfile

import pytest

# One temporary folder for the session's own files outside pytest's tmp_path (the generated
# data sets, the fits' output folders), removed when the session ends. The fits' worker
# processes import this module too: they use their parent's folder.
_OWN_TMP = "D2SEG_TEST_TMP" not in os.environ
if _OWN_TMP:
    os.environ["D2SEG_TEST_TMP"] = tempfile.mkdtemp(prefix="d2seg-tests-")
SESSION_TMP = os.environ["D2SEG_TEST_TMP"]
# Before d2seg is imported anywhere: where the built-in data sets are generated.
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(SESSION_TMP, "datasets"))
# The shapes configs start from d2seg://shapes/R18-GN-pretrained (15 min to make): tests train from
# scratch (MODEL.WEIGHTS ""), and one that would make it implicitly fails at once instead.
os.environ.setdefault("D2SEG_PRETRAIN_ON_FIRST_USE", "0")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
CONFIGS = os.path.join(REPO, "configs")


def load_script(path):
    """The script at ``path`` (relative to the repository: ``tools/<name>.py`` or
    ``dev/<folder>/<name>.py``) imported as the module ``<name>``, without running its
    ``__main__`` block. Its folder is first on sys.path while it is imported, so that the
    scripts beside it that it imports are found."""
    import importlib.util

    name = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.dirname(os.path.join(REPO, path))
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


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
    "MODEL.WEIGHTS", "",
]


def tiny_opts(output_dir, max_iter=10, **extra):
    opts = list(TINY_SHAPES) + ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "()",
                                "OUTPUT_DIR", str(output_dir)]
    for k, v in extra.items():
        opts += [k.replace("__", "."), str(v)]
    return opts


def square_polygon(x, y, s):
    """The flat COCO polygon [x0, y0, x1, y1, ...] of the square of side ``s`` at (x, y)."""
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def boxes_input(n, size=64):
    """A random image with n non-overlapping rectangular instances (20x16 px, classes
    0..4 cycling) as a Detectron2 model input; n = 0 gives an image without instances."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    img = torch.rand(3, size, size) * 255
    inst = Instances((size, size))
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    boxes = []
    for i in range(n):
        x, y = 4 + 14 * i, 6 + 10 * i
        masks[i, y:y + 20, x:x + 16] = True
        boxes.append([x, y, x + 16, y + 20])
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.arange(n) % 5
    inst.gt_masks = BitMasks(masks)
    return {"image": img, "instances": inst}


def assert_compiled_matches_eager(fn, args):
    """torch.compile(fn) (fullgraph, aot_eager: the registered ops' fake and autograd
    implementations) gives the eager value and the eager gradients to every argument."""
    import torch

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager = fn(*args)
    ge = torch.autograd.grad(eager, args)
    comp = compiled(*args)
    gc = torch.autograd.grad(comp, args)
    torch.testing.assert_close(comp, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.fixture(autouse=True, scope="module")
def _builtin_shapes_registrations_restored():
    """Tests that prepare the tiny shapes sets re-register the built-in names with tiny
    parameters: put back the built-in registrations after each module, so that no test
    depends on the order of the modules."""
    yield
    if "d2seg" in sys.modules:
        from d2seg.data.builtin import register_builtin_shapes

        register_builtin_shapes()


# The loggers as they are before any test: Detectron2's setup_logger (called by the tools'
# main() that tests run in-process, also from module-scoped fixtures) turns off propagation
# and adds handlers.
_LOGGERS = ("d2seg", "detectron2", "fvcore", "d2", "gallery")
_PRISTINE_LOGGERS = {}
for _name in _LOGGERS:
    _logger = logging.getLogger(_name)
    _PRISTINE_LOGGERS[_name] = (_logger.propagate, _logger.level, list(_logger.handlers))


@pytest.fixture(autouse=True)
def _loggers_restored():
    """Put the loggers back as they were before any test, after each test, so that tests
    reading the logs through pytest's caplog, or checking that a tool leaves the process as
    it found it, do not depend on which tests ran before them."""
    yield
    for name, (propagate, level, handlers) in _PRISTINE_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.propagate, logger.level = propagate, level
        for h in list(logger.handlers):
            if h not in handlers:
                logger.removeHandler(h)


@pytest.fixture(scope="session")
def python():
    return sys.executable


# test modules parametrised by ``config`` whose tests wait for tests/fitting.py's fits
FIT_MODULES = ("test_learning", "test_autocast_models", "test_deploy_ap", "test_precision_ap")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """Start the fits (tests/fitting.py) that the selected tests need, in the background, and
    run the tests that use them last."""
    needed = []
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", "")
        if module in FIT_MODULES and hasattr(item, "callspec"):
            c = item.callspec.params.get("config")
            if c and c not in needed:
                needed.append(c)
    if needed:
        import fitting

        fitting.prefetch(needed)
        # the tests that wait for fits run last, so that the fits proceed in the background
        # while the rest of the suite runs
        waits = [i for i in items if getattr(getattr(i, "module", None), "__name__", "")
                 in FIT_MODULES]
        items[:] = [i for i in items if i not in waits] + waits


def pytest_sessionfinish(session, exitstatus):
    """Stop fits nobody will wait for (a run stopped by -x or ^C), and remove the session's
    temporary folder."""
    import shutil

    fitting = sys.modules.get("fitting")
    if fitting is not None:
        fitting.shutdown()
    if _OWN_TMP:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test with one intra-op thread, as the reference fixtures were computed: with
    another thread count the convolutions sum in another order, and on a random-weight
    fixture a mask pixel within rounding of the threshold can flip (BlendMask's fixture
    under 2 threads: mask IoU 0.985 on one detection, 1.0 with one thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
