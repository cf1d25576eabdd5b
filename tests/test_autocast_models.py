"""Every shapes config under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

For each config the model fitted in float32 to a few fixed shapes images by tests/fitting.py
(the same fit the learning tests evaluate, made once per session) is copied, so that it
returns confident, well-separated detections (on random weights every score sits near the
prior and the comparison would only measure ties). Then:

- one training step under autocast (forward, backward, SGD step): finite losses, finite
  gradients and finite parameters after the step;
- inference in float32 and under autocast on the same images: finite outputs, and
  agreement within the tolerances below (docs/mixed_precision.md states them):

  * instances: each float32 detection scoring at least ``CONFIDENT`` and covering at
    least ``MIN_AREA`` pixels (at most the ten best; there must be one) has an autocast detection of the same class with box IoU
    >= ``BOX_IOU``, score within ``SCORE_TOL`` and, for masks, mask IoU >= ``MASK_IOU``;
    at least ``MATCHED`` of them, over all images, must match (bfloat16 keeps 8 bits of mantissa: a
    detection whose score differs from a neighbour's by less than that can swap places
    with it, and non-maximum suppression can keep the other one);
  * semantic segmentation: the per-pixel argmax agrees on at least ``SEM_AGREE`` of the
    pixels.
"""
import copy
import os

import numpy as np
import pytest
import torch
from detectron2.structures import pairwise_iou
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, tiny_opts
from fitting import SHAPES_CONFIGS, fitted

CONFIDENT = 0.25
BOX_IOU = 0.8
SCORE_TOL = 0.05
MASK_IOU = 0.7
MATCHED = 0.75
# detections whose mask (or box) covers fewer pixels are not compared: a one-pixel shift of
# a 4x4 mask's edge moves its IoU below any useful tolerance
MIN_AREA = 64
SEM_AGREE = 0.97


def test_every_shapes_config_is_covered():
    assert len(SHAPES_CONFIGS) >= 16, SHAPES_CONFIGS


def _fitted_model(config):
    """A copy of the model tests/fitting.py fitted for ``config`` (shared with the learning
    tests: fitted once per session), its config and its fixed training batch."""
    fit = fitted(config)
    return fit.cfg, copy.deepcopy(fit.model), fit.batch


def _mask_iou(a, b):
    a, b = a.bool(), b.bool()
    union = (a | b).sum()
    return 1.0 if union == 0 else ((a & b).sum() / union).item()  # two empty masks agree


def compare_instances(ref, out):
    """(matched, compared, worst) for the confident float32 detections of ``ref``: each is
    matched to the autocast detection of its class, within ``SCORE_TOL`` of its score, that
    overlaps it most (box IoU, and mask IoU where there are masks; models such as SparseInst
    return near-duplicates that differ only in score)."""
    masks = ref.has("pred_masks")
    area = ref.pred_masks.flatten(1).sum(1) if masks else ref.pred_boxes.area()
    conf = ((ref.scores >= CONFIDENT) & (area >= MIN_AREA)).nonzero().flatten()[:10]
    worst = {"box_iou": 1.0, "score": 0.0, "mask_iou": 1.0}
    matched = 0
    for i in conf.tolist():
        cand = ((out.pred_classes == ref.pred_classes[i])
                & ((out.scores.float() - float(ref.scores[i])).abs() <= SCORE_TOL)).nonzero().flatten()
        best = (0.0, 0.0, 0.0)  # (overlap, box IoU, mask IoU)
        for j in cand.tolist():
            biou = float(pairwise_iou(ref.pred_boxes[i:i + 1], out.pred_boxes[j:j + 1])[0, 0])
            miou = _mask_iou(ref.pred_masks[i], out.pred_masks[j]) if masks else 1.0
            best = max(best, (min(biou, miou), biou, miou))
        worst = {"box_iou": min(worst["box_iou"], best[1]), "mask_iou": min(worst["mask_iou"], best[2])}
        matched += best[1] >= BOX_IOU and best[2] >= MASK_IOU
    return matched, len(conf), worst


def _finite_outputs(results):
    for r in results:
        if "sem_seg" in r:
            assert torch.isfinite(r["sem_seg"].float()).all()
        if "instances" in r:
            inst = r["instances"]
            assert torch.isfinite(inst.scores.float()).all()
            assert torch.isfinite(inst.pred_boxes.tensor.float()).all()


@pytest.mark.parametrize("config", SHAPES_CONFIGS)
def test_model_under_bfloat16_autocast(config, tmp_path):
    cfg, model, batch = _fitted_model(config)
    images = [{"image": b["image"], "height": b["image"].shape[1], "width": b["image"].shape[2]}
              for b in batch]

    # inference: float32, then bfloat16 autocast, same weights and images
    model.eval()
    with torch.no_grad():
        ref = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    _finite_outputs(out)
    report = []
    total_matched = total = 0
    for r, o in zip(ref, out):
        if "sem_seg" in r:
            agree = (r["sem_seg"].argmax(0) == o["sem_seg"].float().argmax(0)).float().mean().item()
            report.append(f"semantic argmax agreement {agree:.4f}")
            assert agree >= SEM_AGREE, (config, agree)
        else:
            matched, n, worst = compare_instances(r["instances"], o["instances"])
            report.append(f"{matched}/{n} confident detections matched, worst {worst}")
            assert n > 0, f"{config}: no float32 detection scoring >= {CONFIDENT} after fitting (best {r['instances'].scores.max() if len(r['instances']) else None})"
            total_matched, total = total_matched + matched, total + n
    # over all images: with 4-7 confident detections per image, a single NMS swap of two
    # near-duplicates would decide a per-image fraction
    assert total_matched >= MATCHED * total, (config, report)
    print(config, "; ".join(report))

    # one training step under autocast
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage(0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model(batch)
        assert losses and all(torch.isfinite(v.float()).all() for v in losses.values()), losses
        opt.zero_grad()
        sum(v.float() for v in losses.values()).backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{config}: non-finite gradients in {bad[:5]}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_amp_training_on_cpu_runs_bfloat16_autocast(tmp_path):
    """SOLVER.AMP.ENABLED on a CPU-only machine trains under bfloat16 autocast (Detectron2's
    AMPTrainer requires CUDA); float16 on CPU is a clear error naming the key."""
    from detectron2.engine import HookBase

    from d2seg.engine import Trainer, setup_cfg
    from d2seg.engine.trainer import CPUAutocastTrainer

    config = os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml")
    cfg = setup_cfg(config, tiny_opts(tmp_path, max_iter=4, SOLVER__AMP__ENABLED=True,
                                      SOLVER__CHECKPOINT_PERIOD=1000))
    seen = []

    class Record(HookBase):
        def after_step(self):
            seen.append(self.trainer.storage.history("total_loss").latest())

    trainer = Trainer(cfg)
    assert isinstance(trainer._trainer, CPUAutocastTrainer)
    assert trainer._trainer.precision == torch.bfloat16
    # the forward runs under autocast: the backbone's P3 comes out in bfloat16 (P6/P7 are
    # float32 on these 64 px images, see d2seg.fcos.backbone.P6P7)
    dtypes = []

    def record_dtype(module, inputs, outputs):
        if module.training:  # not the evaluation after training
            dtypes.append(outputs["p3"].dtype)

    trainer.model.backbone.register_forward_hook(record_dtype)
    trainer.register_hooks([Record()])
    trainer.train()
    assert len(seen) == 4 and all(np.isfinite(loss) for loss in seen)
    assert len(dtypes) == 4 and all(d == torch.bfloat16 for d in dtypes)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trainer.model.parameters())

    bad = setup_cfg(config, tiny_opts(tmp_path, SOLVER__AMP__ENABLED=True, SOLVER__AMP__PRECISION="float16"))
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION.*float16.*CPU"):
        Trainer(bad)
    bad = setup_cfg(config, tiny_opts(tmp_path, SOLVER__AMP__ENABLED=True, SOLVER__AMP__PRECISION="half"))
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION: unknown dtype 'half'"):
        Trainer(bad)


def test_p6p7_under_cpu_autocast_gives_finite_weight_gradients():
    """PyTorch's CPU bfloat16 conv backward leaves weight-gradient entries uninitialised for
    a 3x3 stride-2 conv on a 1x1 input; d2seg's P6P7 runs such convs in float32."""
    from detectron2.modeling.backbone.fpn import LastLevelP6P7

    from d2seg.fcos.backbone import P6P7, use_safe_top_blocks

    torch.manual_seed(0)
    model = torch.nn.Sequential(LastLevelP6P7(32, 32))
    assert use_safe_top_blocks(model) == 1 and type(model[0]) is P6P7
    for _ in range(20):
        torch.full((1 << 16,), float("nan"))  # leave NaNs in freed memory
        model.zero_grad()
        x = torch.randn(2, 32, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p6, p7 = model[0](x)
        (p6.float().sum() + p7.float().sum()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # same parameters and outputs as Detectron2's module outside autocast
    ref = LastLevelP6P7(32, 32)
    ref.load_state_dict(model[0].state_dict())
    x = torch.randn(1, 32, 4, 4)
    for a, b in zip(ref(x), model[0](x)):
        torch.testing.assert_close(a, b)
