"""Validation while training (d2seg.engine.hooks): the evaluator's AP and the validation
losses in metrics.json at TEST.EVAL_PERIOD, model_best.pth for SOLVER.BEST_CHECKPOINT,
early stopping, a best that survives --resume, and validation losses for every method."""
import glob
import json
import logging
import math
import os

import pytest
import torch

from conftest import CONFIGS, tiny_opts

MASK_RCNN = os.path.join(CONFIGS, "quick", "mask_rcnn_shapes.yaml")
CONDINST = os.path.join(CONFIGS, "CondInst", "condinst_R18_shapes.yaml")
FCOS = os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml")
# every shapes config; a few in the default suite (one of each loss structure), the rest slow
FAST = {"BlendMask/blendmask_R18_shapes.yaml", "CondInst/condinst_R18_shapes.yaml",
        "SOLO/solov2_shapes.yaml", "SparseInst/sparse_inst_r18_giam_shapes.yaml",
        "quick/semantic_fpn_shapes.yaml"}
SHAPES_CONFIGS = [
    pytest.param(c, marks=() if c in FAST else pytest.mark.slow)
    for c in sorted(os.path.relpath(p, CONFIGS)
                    for p in glob.glob(os.path.join(CONFIGS, "**", "*shapes*.yaml"), recursive=True)
                    if not os.path.basename(p).startswith("Base-"))
]


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train(config, output_dir, max_iter, *opts):
    from d2seg.engine import Trainer, setup_cfg

    cfg = setup_cfg(config, tiny_opts(output_dir, max_iter=max_iter) + list(opts))
    trainer = Trainer(cfg)
    return trainer, trainer.train()


def test_validation_ap_losses_and_best_checkpoint(tmp_path, caplog):
    """CondInst, 4 iterations, EVAL_PERIOD 2: segm/AP and the validation losses (one per
    training loss) are in metrics.json at iterations 1 and 4 (after training, logged at
    MAX_ITER as Detectron2 does; each evaluation written, though the writers' period is 20),
    model_best.pth holds the weights of the best segm/AP with its iteration, and
    last_checkpoint still names the latest checkpoint."""
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="d2seg.engine.hooks"):
        trainer, _ = train(CONDINST, out, 4, "TEST.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "1000",
                           "SOLVER.BEST_CHECKPOINT", "('segm/AP', 'max')",
                           # every image gets detections, so that AP is a number from the start
                           "MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10")
    records = read_metrics(out)
    train_losses = {k for r in records for k in r if k.startswith("loss_")}
    assert len(train_losses) >= 4  # fcos cls, loc, ctr and the mask loss
    evals = {r["iteration"]: r for r in records if "validation_loss" in r}
    assert sorted(evals) == [1, 4]
    for it, r in evals.items():
        losses = {k: v for k, v in r.items() if k.startswith("validation/")}
        assert set(losses) == {f"validation/{k}" for k in train_losses}, r
        assert all(math.isfinite(v) and v >= 0 for v in losses.values())
        assert r["validation_loss"] == pytest.approx(sum(losses.values()))
        assert "segm/AP" in r and "bbox/AP" in r
    # TensorBoard (Detectron2's default writers) gets the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(out / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    for key in ("validation_loss", "segm/AP"):
        assert [e.step for e in acc.Scalars(key)] == [1, 4]

    state = json.loads((out / "model_best.json").read_text())
    aps = {h["iteration"]: h["value"] for h in state["history"]}
    assert aps == pytest.approx({it: evals[it]["segm/AP"] for it in evals})
    best_it = max(aps, key=lambda i: (aps[i], -i))  # the first of the best
    assert state["best"] == {"iteration": best_it, "value": pytest.approx(aps[best_it])}
    best = torch.load(out / "model_best.pth", weights_only=True)
    assert best["iteration"] == best_it and best["metric"] == {"segm/AP": pytest.approx(aps[best_it])}
    assert best["model"].keys() == trainer.checkpointer.model.state_dict().keys()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert any("New best segm/AP" in r.getMessage() for r in caplog.records)


def test_validation_losses_leave_the_model_as_it_was(tmp_path):
    """validation_losses: the model comes back in the mode it had, with the same parameters
    and buffers (batch-norm statistics included), and the training's random stream is not
    consumed; the losses are those the model computes in training mode, averaged."""
    from detectron2.data import build_detection_test_loader
    from detectron2.utils.events import EventStorage

    from d2seg.data import prepare_datasets
    from d2seg.engine import Trainer, setup_cfg
    from d2seg.engine.hooks import validation_losses, validation_mapper

    # Mask R-CNN samples proposals at random in training mode; BN in the backbone
    cfg = setup_cfg(MASK_RCNN, tiny_opts(tmp_path) + ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
                                                      "D2SEG.SHAPES.NUM_VAL", "2"])
    prepare_datasets(cfg)
    model = Trainer.build_model(cfg)
    model.eval()
    model.roi_heads.train()  # a mix of modes comes back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = build_detection_test_loader(cfg, "shapes_val", mapper=validation_mapper(cfg), batch_size=2)
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    with EventStorage(0):
        losses = validation_losses(model, loader)
        assert torch.equal(torch.get_rng_state(), rng)
        assert {name: m.training for name, m in model.named_modules()} == modes
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed"
        # the same numbers, batch by batch, from the model in training mode (BN frozen), under
        # the same random state
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        sums, n = {}, 0
        with torch.no_grad():
            for batch in loader:
                for k, v in model(batch).items():
                    sums[k] = sums.get(k, 0) + float(v) * len(batch)
                n += len(batch)
    assert n == 2
    assert losses["validation"] == pytest.approx({k: v / n for k, v in sums.items()})


def test_early_stop_and_resume_keep_the_best(tmp_path, caplog):
    """FCOS with a zero learning rate: the model never changes, so no evaluation improves on
    the first. With EVAL_PERIOD 1 and patience 1 training stops cleanly at iteration 1, with
    model_final.pth at that iteration. A run resumed from iteration 0's checkpoint keeps the
    best of the first run (iteration 0) and stops at iteration 1 again; a run that forgot it
    would take iteration 1 as its first best and stop at 2."""
    out = tmp_path / "run"
    common = ["SOLVER.BASE_LR", "0.0", "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1",
              "SOLVER.BEST_CHECKPOINT", "('validation_loss', 'min')", "SOLVER.EARLY_STOP_PATIENCE", "1"]
    with caplog.at_level(logging.INFO, logger="d2seg.engine.hooks"):
        train(FCOS, out, 20, *common)
    assert any("Early stop at iteration 1" in r.getMessage() for r in caplog.records)
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 1
    assert max(r["iteration"] for r in read_metrics(out)) == 1
    state = json.loads((out / "model_best.json").read_text())
    assert state["best"]["iteration"] == 0 and [h["iteration"] for h in state["history"]] == [0, 1]
    assert state["history"][0]["value"] == state["history"][1]["value"]

    # resume from model_0000000.pth (as if killed during iteration 1): the evaluation at 1 is
    # run again and the best stays at 0
    (out / "last_checkpoint").write_text("model_0000000.pth")
    caplog.clear()
    from d2seg.engine import Trainer, setup_cfg

    trainer = Trainer(setup_cfg(FCOS, tiny_opts(out, max_iter=20) + common))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 1
    with caplog.at_level(logging.INFO, logger="d2seg.engine.hooks"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records]
    assert any("Resumed the best validation_loss" in m and "iteration 0 (0 evaluation(s) since)" in m
               for m in messages), messages
    assert any("Early stop at iteration 1" in m for m in messages), messages
    state = json.loads((out / "model_best.json").read_text())
    assert state["best"]["iteration"] == 0 and [h["iteration"] for h in state["history"]] == [0, 1]


def test_best_checkpoint_setting_errors():
    from d2seg.engine import setup_cfg
    from d2seg.engine.hooks import best_checkpoint_setting

    def setting(*opts):
        return best_checkpoint_setting(setup_cfg(FCOS, list(opts)))

    assert setting() is None
    assert setting("TEST.EVAL_PERIOD", "5", "SOLVER.BEST_CHECKPOINT", "('bbox/AP', 'max')") == ("bbox/AP", "max")
    with pytest.raises(ValueError, match="SOLVER.BEST_CHECKPOINT .* needs evaluations during training: set "
                                         "TEST.EVAL_PERIOD"):
        setting("SOLVER.BEST_CHECKPOINT", "('bbox/AP', 'max')")
    with pytest.raises(ValueError, match=r"SOLVER.BEST_CHECKPOINT must be \(metric, 'max' or 'min'\).*'best'"):
        setting("TEST.EVAL_PERIOD", "5", "SOLVER.BEST_CHECKPOINT", "('bbox/AP', 'best')")
    with pytest.raises(ValueError, match="SOLVER.EARLY_STOP_PATIENCE needs the metric"):
        setting("TEST.EVAL_PERIOD", "5", "SOLVER.EARLY_STOP_PATIENCE", "3")


@pytest.mark.parametrize("config", SHAPES_CONFIGS)
def test_every_method_has_validation_losses(config, tmp_path):
    """Each shapes config gives finite validation losses (the names of its training losses)
    on two images of the validation set, through the validation mapper."""
    from detectron2.data import build_detection_test_loader
    from detectron2.utils.events import EventStorage

    from d2seg.data import prepare_datasets
    from d2seg.engine import Trainer, setup_cfg
    from d2seg.engine.hooks import validation_losses, validation_mapper

    cfg = setup_cfg(os.path.join(CONFIGS, config), tiny_opts(tmp_path) + ["D2SEG.SHAPES.NUM_VAL", "2"])
    prepare_datasets(cfg)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    batch = next(iter(Trainer.build_train_loader(cfg)))
    with EventStorage(0):
        model.train()
        train_keys = set(model(batch))
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0], mapper=validation_mapper(cfg),
                                             batch_size=2)
        losses = validation_losses(model, loader)
    assert set(losses["validation"]) == train_keys
    values = torch.tensor(list(losses["validation"].values()))
    assert torch.isfinite(values).all() and losses["validation_loss"] == pytest.approx(float(values.sum()))


@pytest.mark.slow
def test_early_stop_in_two_processes(tmp_path):
    """Two processes (gloo): the main process decides (only it has the AP), both stop at the
    same iteration and the run exits cleanly, with the validation losses of both shards."""
    import subprocess
    import sys

    from conftest import TOOLS

    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(TOOLS, "train_net.py"), "--config-file", FCOS, "--num-gpus", "2"]
    argv += tiny_opts(out, max_iter=20) + [
        "SOLVER.BASE_LR", "0.0", "TEST.EVAL_PERIOD", "1", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "SOLVER.BEST_CHECKPOINT", "('validation_loss', 'min')", "SOLVER.EARLY_STOP_PATIENCE", "1"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    log = (out / "log.txt").read_text()
    assert "Early stop at iteration 1" in log
    assert "Early stop at iteration 1" in (out / "log.txt.rank1").read_text()
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 1
    state = json.loads((out / "model_best.json").read_text())
    assert [h["iteration"] for h in state["history"]] == [0, 1]
