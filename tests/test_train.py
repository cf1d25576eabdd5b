"""The training/evaluation entry points on the built-in data set: config errors, loss
decrease, --eval-only through COCOEvaluator (reproducing a fitted model's AP), the demo, resume after a kill, atomic
checkpoints and 2-process (gloo) training."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CONFIGS, REPO, TOOLS, tiny_opts

MASK_RCNN = os.path.join(CONFIGS, "quick", "mask_rcnn_shapes.yaml")


def run_tool(args, timeout=600, check=True, **kw):
    out = subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def test_unknown_config_key_names_key_and_file(tmp_path):
    from d2seg.engine import setup_cfg

    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{MASK_RCNN}"\nMODEL:\n  NOT_A_KEY: 3\n')
    with pytest.raises(KeyError, match=r"bad\.yaml.*NOT_A_KEY"):
        setup_cfg(str(bad))
    with pytest.raises(KeyError, match="SOLVER.NOPE"):
        setup_cfg(MASK_RCNN, ["SOLVER.NOPE", "1"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        setup_cfg(str(tmp_path / "missing.yaml"))
    cfg = setup_cfg(MASK_RCNN)
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.RESNETS.NORM == "GN"
    assert cfg.SOLVER.MAX_ITER == 2000 and cfg.SOLVER.STEPS == (1600, 1850) and cfg.SOLVER.IMS_PER_BATCH == 4


def test_optimizers_from_config():
    from d2seg.engine import build_optimizer, setup_cfg

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    for name, cls in [("SGD", torch.optim.SGD), ("ADAM", torch.optim.Adam), ("ADAMW", torch.optim.AdamW)]:
        cfg = setup_cfg(MASK_RCNN, ["SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", "0.5"])
        opt = build_optimizer(cfg, model)
        assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(setup_cfg(MASK_RCNN, ["SOLVER.OPTIMIZER", "LION"]), model)
    # full-model clipping bounds the global gradient norm
    cfg = setup_cfg(MASK_RCNN, ["SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1e-3", "SOLVER.BASE_LR", "1.0",
                                "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0",
                                "SOLVER.WEIGHT_DECAY_NORM", "0.0"])
    lin = torch.nn.Linear(4, 1, bias=False)
    opt = build_optimizer(cfg, lin)
    before = lin.weight.detach().clone()
    (lin(torch.ones(1, 4)) * 1000).sum().backward()
    opt.step()
    assert (lin.weight.detach() - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_few_iterations_reduce_the_loss(tmp_path):
    from detectron2.engine import HookBase

    from d2seg.engine import Trainer, setup_cfg

    cfg = setup_cfg(MASK_RCNN, tiny_opts(tmp_path, max_iter=30, SOLVER__BASE_LR=0.01,
                                         SOLVER__CHECKPOINT_PERIOD=1000))
    losses = []

    class Record(HookBase):
        def after_step(self):
            losses.append(self.trainer.storage.history("total_loss").latest())

    trainer = Trainer(cfg)
    trainer.register_hooks([Record()])
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len(losses) == 30 and all(map(lambda x: x == x, losses))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short real run of tools/train_net.py, reused by the eval/demo tests."""
    out = tmp_path_factory.mktemp("train")
    run_tool([os.path.join(TOOLS, "train_net.py"), "--config-file", MASK_RCNN]
             + tiny_opts(out, max_iter=12, SOLVER__CHECKPOINT_PERIOD=1000))
    assert (out / "model_final.pth").exists()
    return out


def test_eval_only_reproduces_the_fitted_models_ap(tmp_path):
    """``train_net.py --eval-only`` on a checkpoint of the yardstick fitted by tests/fitting.py
    (the fit the learning test evaluates) reports, through COCOEvaluator, the box and mask AP
    that the in-process evaluation gave, and both clear the learning test's bars."""
    from detectron2.checkpoint import DetectionCheckpointer

    from fitting import evaluate, fit_opts, fitted, plan_for
    from test_learning import BARS

    config = "quick/mask_rcnn_shapes.yaml"
    fit = fitted(config)
    expected = evaluate(fit)
    DetectionCheckpointer(fit.model, save_dir=str(tmp_path)).save("fitted")
    res = run_tool([os.path.join(TOOLS, "train_net.py"), "--config-file", MASK_RCNN, "--eval-only"]
                   + fit_opts(plan_for(config), tmp_path / "eval")
                   + ["DATASETS.TEST", str(tuple(fit.cfg.DATASETS.TEST)),
                      "MODEL.WEIGHTS", str(tmp_path / "fitted.pth")])
    log = res.stdout + res.stderr
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    for task in ("bbox", "segm"):
        m = re.search(rf"copypaste: Task: {task}\n.*copypaste: AP,AP50.*\n.*copypaste: ([0-9.nan]+),", log)
        assert m, log[-3000:]
        ap = float(m.group(1))
        assert abs(ap - expected[task]["AP"]) < 0.05, (task, ap, expected[task]["AP"])
        assert ap >= BARS[config][task], (task, ap)
    assert (tmp_path / "eval" / "inference" / "coco_instances_results.json").exists()


def test_demo_writes_images_and_names_bad_files(trained, tmp_path):
    import numpy as np
    from PIL import Image

    img = tmp_path / "in" / "a.jpg"
    img.parent.mkdir()
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(img)
    (tmp_path / "in" / "broken.png").write_bytes(b"this is not a png")
    res = run_tool([os.path.join(TOOLS, "demo.py"), "--config-file", MASK_RCNN, "--input",
                    str(img.parent), "--output", str(tmp_path / "out"), "--confidence-threshold", "0.3",
                    "--opts"] + tiny_opts(tmp_path / "o") + ["MODEL.WEIGHTS", str(trained / "model_final.pth")],
                   check=False)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "cannot read image" in res.stderr and "broken.png" in res.stderr
    out = Image.open(tmp_path / "out" / "a.png")
    assert out.size == (64, 64)
    # --scale enlarges the picture; a model that draws nothing says so, with its best score
    res = run_tool([os.path.join(TOOLS, "demo.py"), "--config-file", MASK_RCNN, "--input", str(img),
                    "--output", str(tmp_path / "big.png"), "--confidence-threshold", "1.01", "--scale", "3",
                    "--opts"] + tiny_opts(tmp_path / "o") + ["MODEL.WEIGHTS", str(trained / "model_final.pth")])
    assert Image.open(tmp_path / "big.png").size == (192, 192)
    log = res.stdout + res.stderr
    assert "nothing drawn: no instance scored >= --confidence-threshold 1.01" in log, log[-2000:]
    assert re.search(r"the highest score was 0\.\d{3}|the model returned no instance at all", log)


def test_resume_after_kill_continues_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(TOOLS, "train_net.py"), "--config-file", MASK_RCNN] + tiny_opts(
        out, max_iter=1000, SOLVER__CHECKPOINT_PERIOD=3)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300

        def tagged():  # the checkpoint that last_checkpoint names (written after the file)
            try:
                m = re.match(r"model_(\d+)\.pth", (out / "last_checkpoint").read_text().strip())
            except OSError:
                return -1
            return int(m.group(1)) if m else -1

        while tagged() < 5:
            assert proc.poll() is None, "training exited early"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    last = (out / "last_checkpoint").read_text().strip()
    done = int(re.match(r"model_(\d+)\.pth", last).group(1))
    assert done >= 5
    # every checkpoint that exists under its final name is complete
    for f in out.glob("model_*.pth"):
        torch.load(f, map_location="cpu", weights_only=False)

    res = run_tool([os.path.join(TOOLS, "train_net.py"), "--config-file", MASK_RCNN, "--resume"]
                   + tiny_opts(out, max_iter=done + 3, SOLVER__CHECKPOINT_PERIOD=3))
    log = res.stdout + res.stderr
    assert f"Resuming at iteration {done + 1}" in log, log[-3000:]
    assert f"Starting training from iteration {done + 1}" in log
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == done + 2  # iterations done+1 .. done+2 ran after the resume


def test_interrupted_checkpoint_write_leaves_previous_state(tmp_path):
    from d2seg.engine.checkpoint import _atomic_write

    target = tmp_path / "model_0000009.pth"
    torch.save({"ok": 1}, target)

    def half_write(f):
        f.write(b"\x80\x02partial")
        raise KeyboardInterrupt  # like a kill in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(str(target), half_write)
    assert torch.load(target, weights_only=True) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000009.pth"]


DDP_SCRIPT = r'''
import os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_opts
from detectron2.engine import launch
from detectron2.utils import comm
import d2seg
from d2seg.engine import Trainer, setup_cfg

def main(out):
    cfg = setup_cfg({cfg!r}, tiny_opts(out, max_iter=3, SOLVER__CHECKPOINT_PERIOD=1000))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    assert comm.get_world_size() == 2
    torch.save(model.state_dict(), os.path.join(out, "rank%d.pth" % comm.get_rank()))

if __name__ == "__main__":
    launch(main, 2, dist_url="tcp://127.0.0.1:%d" % int(sys.argv[2]), args=(sys.argv[1],))
'''


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), cfg=MASK_RCNN))
    # two processes on 2 cores: one thread each (OpenMP spin-waits make oversubscription slow)
    run_tool([str(script), str(tmp_path), str(port)], timeout=600,
             env=dict(os.environ, OMP_NUM_THREADS="1"))
    a = torch.load(tmp_path / "rank0.pth", weights_only=True)
    b = torch.load(tmp_path / "rank1.pth", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"ranks differ at {k}")


def test_train_net_registers_your_own_coco_data(tmp_path):
    """--register-coco NAME JSON IMAGE_ROOT: a 3-class COCO file trains with a shapes config
    once its explicit 5-class key is overridden, and without the override the run stops
    with the error naming the key and both numbers."""
    import json

    import numpy as np
    from PIL import Image

    images, anns = [], []
    for i in range(4):
        arr = np.full((64, 64, 3), 30, dtype=np.uint8)
        x0, y0 = 8 + 4 * i, 10
        arr[y0:y0 + 24, x0:x0 + 20] = (200, 60 * (i % 3), 90)
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 64})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": [3, 5, 9][i % 3], "iscrowd": 0,
                     "bbox": [x0, y0, 20, 24], "area": 480,
                     "segmentation": [[x0, y0, x0 + 20, y0, x0 + 20, y0 + 24, x0, y0 + 24]]})
    cats = [{"id": c, "name": n} for c, n in [(3, "red"), (5, "orange"), (9, "pink")]]
    (tmp_path / "mine.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    fcos = os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml")
    base = [os.path.join(TOOLS, "train_net.py"), "--config-file", fcos,
            "--register-coco", "mine_train", str(tmp_path / "mine.json"), str(tmp_path)]
    data = ["DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "()"]
    res = run_tool(base + tiny_opts(tmp_path / "bad", max_iter=2) + data, check=False)
    assert res.returncode != 0
    assert "MODEL.FCOS.NUM_CLASSES is 5 in the config, but the training data (mine_train) has 3" in res.stderr
    res = run_tool(base + tiny_opts(tmp_path / "ok", max_iter=2, SOLVER__CHECKPOINT_PERIOD=1000) + data
                   + ["MODEL.FCOS.NUM_CLASSES", "3"])
    assert (tmp_path / "ok" / "model_final.pth").exists()
    weights = torch.load(tmp_path / "ok" / "model_final.pth", weights_only=True)["model"]
    cls = [v for k, v in weights.items() if k.endswith("cls_logits.weight")]
    assert cls and cls[0].shape[0] == 3
