"""docs/own_data.md is true: its commands run as written on a tiny COCO file made here; every
COCO config of its table trains on 1 and on 90 classes; the two-machine flags of
tools/train_net.py work as two local processes (gloo)."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, REPO, TINY_SHAPES, TOOLS, tiny_opts

DOC = os.path.join(REPO, "docs", "own_data.md")
NOT_RUN = "<!-- not run by tests/test_own_data_docs.py"
# what the commands get appended: a small input, few iterations, and no download (the test
# has no network; the checkpoint loading is tested in test_classes.py and test_model_zoo.py)
TRAIN_TINY = TINY_SHAPES + [
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "1", "MODEL.WEIGHTS", "",
    # scores of an untrained model are below the default 0.05: detections, so that AP is a number
    "MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10"]
TEST_TINY = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.FCOS.INFERENCE_TH_TEST", "0.0"]


def make_coco(root, split, num_images, categories, seed=0):
    """ann/<split>.json and images/<split>/*.png: num_images 64x64 images with two
    rectangles each, of the given category ids (cycling)."""
    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "ann").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        arr = np.full((64, 64, 3), 30, dtype=np.uint8)
        for j in range(2):
            x0, y0 = 6 + 26 * j + int(rng.integers(0, 4)), 8 + int(rng.integers(0, 20))
            w, h = 20, 24
            cat = categories[(2 * i + j) % len(categories)]
            arr[y0:y0 + h, x0:x0 + w] = (200, (37 * cat) % 256, 90)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                         "bbox": [x0, y0, w, h], "area": w * h,
                         "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]})
        Image.fromarray(arr).save(root / "images" / split / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 64})
    return {"images": images, "annotations": anns}


def write_coco(root, split, num_images, num_classes, used=None):
    """A COCO file of ``num_classes`` categories (ids 1..num_classes), of which the
    annotations use ``used`` (default: all)."""
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]
    data = make_coco(root, split, num_images, used or [c["id"] for c in cats])
    data["categories"] = cats
    (root / "ann" / f"{split}.json").write_text(json.dumps(data))
    return root / "ann" / f"{split}.json"


def doc_commands(path=DOC):
    """The shell commands of each ```bash block of the doc that is not marked as not run,
    as argument lists (line continuations joined, comments dropped)."""
    text = open(path).read()
    commands = []
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        before = text[:m.start()].rstrip().splitlines()
        if before and before[-1].startswith(NOT_RUN):
            continue
        for line in m.group(1).replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def with_tiny_settings(argv):
    """A documented command with its python replaced by this interpreter and the small
    settings appended."""
    assert argv[0] == "python", argv
    argv = [sys.executable] + argv[1:]
    tool = os.path.basename(argv[1])
    if tool == "train_net.py":
        return argv + (TEST_TINY if "--eval-only" in argv else TRAIN_TINY)
    if tool == "demo.py":
        assert "--opts" in argv
        return argv + TEST_TINY
    return argv


def test_doc_commands_are_found():
    """The doc's runnable commands: the check, the fine-tune, the plot, the evaluation and
    the demo (the marked blocks, TensorBoard, several machines, SLURM, are left out)."""
    tools = [os.path.basename(c[1]) for c in doc_commands()]
    assert tools == ["train_net.py", "train_net.py", "plot_metrics.py", "train_net.py", "demo.py"]


@pytest.mark.slow
def test_own_data_doc_runs_as_written(tmp_path):
    """Every command of docs/own_data.md (the small settings appended) in a folder with
    ann/ and images/ of a 3-class COCO data set, in order: each succeeds, and its output
    says what the doc says."""
    write_coco(tmp_path, "train", 4, 3)
    write_coco(tmp_path, "val", 2, 3)
    for name in ("tools", "configs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outputs = []
    for argv in doc_commands():
        argv = with_tiny_settings(argv)
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{argv} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
        outputs.append(res.stdout + res.stderr)
    check, finetune, plot, evaluate, demo = outputs
    # the class count of a COCO config follows the data, and the log says so
    assert ("Class counts follow the training data: 3 thing_classes in my_train; set MODEL.FCOS.NUM_CLASSES (80) "
            "(not set by the config) to 3 (and 5 class key(s) of other methods)") in finetune
    # the check sets its method's class key on the command line: kept, nothing to say
    assert "Class counts follow" not in check
    out = tmp_path / "output" / "my_condinst"
    records = [json.loads(line) for line in open(out / "metrics.json")]
    evals = [r for r in records if "validation_loss" in r]
    assert [r["iteration"] for r in evals] == [0, 2] and all("segm/AP" in r for r in evals)
    assert (out / "model_best.pth").is_file() and (out / "model_best.json").is_file()
    assert (out / "metrics.png").is_file()
    assert re.search(r"Evaluation results for segm", evaluate)
    for out_text in (evaluate, demo):  # the model has the checkpoint's 3 classes: all of it loads
        assert "have another shape than the model's" not in out_text
    assert len(os.listdir(out / "demo")) == 2  # one picture per image of images/val


# every COCO config of the doc's table; BlendMask with 90 classes (the basis module's class
# key, once out of range) in the default suite, the rest slow (R-50 models, 20-60 s each here)
TABLE = re.findall(r"`(configs/[^`]+\.yaml)`(?:, `([^`/]+\.yaml)`)?", open(DOC).read().split("| method |")[1]
                   .split("\n\n")[0])
COCO_CONFIGS = sorted({c for first, second in TABLE
                       for c in (first, os.path.join(os.path.dirname(first), second) if second else None) if c})
FAST = {("configs/BlendMask/R_50_1x.yaml", 90)}


def test_table_lists_every_method():
    assert len(COCO_CONFIGS) == 11 and all(os.path.isfile(os.path.join(REPO, c)) for c in COCO_CONFIGS)


@pytest.mark.parametrize("config,num_classes", [
    pytest.param(c, n, marks=() if (c, n) in FAST else pytest.mark.slow) for c in COCO_CONFIGS for n in (1, 90)])
def test_coco_config_trains_on_1_and_90_classes(config, num_classes, tmp_path):
    """The COCO config as it is (R-50, its own heads and optimizer; small input, no
    ImageNet download; MEInst's mask encoding learnt from the data, as the doc's table says)
    on a data set of ``num_classes`` categories: every class layer has that size (no tensor
    sized for COCO's 80 classes left, BlendMask's basis module included) and two steps give
    finite losses."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.events import EventStorage

    from d2seg.data import register_coco_dataset
    from d2seg.engine import Trainer, setup_cfg

    used = [1, num_classes] if num_classes > 1 else [1]
    name = f"_own_{num_classes}_train"
    register_coco_dataset(name, write_coco(tmp_path, "train", 2, num_classes, used), tmp_path / "images" / "train")
    try:
        cfg = setup_cfg(os.path.join(REPO, config), tiny_opts(tmp_path) + [
            "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
            + (["MODEL.MEINST.PATH_COMPONENTS", ""] if "MEInst" in config else []))
        torch.manual_seed(0)
        model = Trainer.build_model(cfg)
        # a class layer has C, C + 1 (background) or A x C (A = 9 anchors per position) channels
        sizes = lambda c: {c, c + 1, 9 * c, 9 * (c + 1)}  # noqa: E731
        wide = {k: tuple(v.shape) for k, v in model.state_dict().items() if sizes(80) & set(v.shape)}
        assert not wide, f"tensors sized for COCO's 80 classes: {wide}"
        if num_classes == 90:
            assert any(sizes(90) & set(v.shape) for v in model.state_dict().values())
        batch = next(iter(Trainer.build_train_loader(cfg)))
        opt = Trainer.build_optimizer(cfg, model)
        model.train()
        with EventStorage(0):
            for _ in range(2):
                losses = model(batch)
                total = sum(losses.values())
                assert torch.isfinite(total), losses
                opt.zero_grad()
                total.backward()
                opt.step()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _train_as_two_machines(tmp_path, launch):
    """Two processes, one per "machine", both on this one: ``launch(rank, port, train_net)``
    gives each its python arguments up to tools/train_net.py; both train FCOS 2 iterations
    with world size 2 and write one model_final.pth."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for rank in (0, 1):
        argv = [sys.executable] + launch(rank, port, os.path.join(TOOLS, "train_net.py")) + ["--config-file", config]
        argv += tiny_opts(tmp_path / "out", max_iter=2, SOLVER__CHECKPOINT_PERIOD=1000, DATASETS__TEST="()")
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"machine {rank}:\n{out[-4000:]}"
    logs = [open(tmp_path / "out" / name).read() for name in ("log.txt", "log.txt.rank1")]
    for rank, log in enumerate(logs):
        assert f"Rank of current process: {rank}. World size: 2" in log
    assert torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)["iteration"] == 1


@pytest.mark.slow
def test_two_machine_flags_as_two_local_processes(tmp_path):
    """The doc's multi-machine launch (--num-machines 2 --machine-rank R --dist-url
    tcp://...) as two processes on this machine (gloo on CPU): both take part in one
    training, and the main process writes the final checkpoint."""
    _train_as_two_machines(tmp_path, lambda rank, port, train_net: [
        train_net, "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", f"tcp://127.0.0.1:{port}"])


@pytest.mark.slow
def test_torchrun_two_machines_as_two_local_processes(tmp_path):
    """The doc's torchrun launch (--nnodes 2 --node-rank R --master-addr --master-port),
    one process per machine, both on this machine: tools/train_net.py joins torchrun's
    group (gloo on CPU) and trains once with world size 2."""
    _train_as_two_machines(tmp_path, lambda rank, port, train_net: [
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
        "--master-addr", "127.0.0.1", "--master-port", str(port), train_net])
