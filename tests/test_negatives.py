"""Every method trains on negatives: images without instances, batches made only of them,
and annotations whose box leaves nothing after clipping to the image. One training forward
and backward per case on 64 px inputs for every shapes config (tiny shapes sets), checking
that every loss is finite and that the backward reaches the parameters."""
import glob
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, boxes_input, tiny_opts

SIZE = 64
SHAPES_CONFIGS = sorted(
    os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "*", "*shapes*.yaml"))
)
# (config, extra KEY VALUE overrides): every shapes config, plus MEInst with the random
# clamp of its targets (the COCO configs' setting, another path through the encoding).
CASES = [(c, ()) for c in SHAPES_CONFIGS] + [
    ("MEInst/meinst_R18_shapes.yaml", ("MODEL.MEINST.TARGET_CLAMP_RANDOM_MAX", "0.05")),
]


def _cfg(config, tmp_path, extra=()):
    from d2seg.engine import setup_cfg

    opts = tiny_opts(tmp_path, DATALOADER__FILTER_EMPTY_ANNOTATIONS=False) + list(extra)
    return setup_cfg(os.path.join(CONFIGS, config), opts)


def _clipped_away_input(cfg, tmp_path):
    """A record whose only annotation lies right of the image, through the real mapper:
    its box is empty after clipping, so the image reaches the model without instances."""
    import cv2

    from d2seg.data import D2SegDatasetMapper

    path = str(tmp_path / "outside.png")
    cv2.imwrite(path, np.full((SIZE, SIZE, 3), 90, np.uint8))
    ann = {"bbox": [SIZE + 5, 10, 20, 20], "bbox_mode": 1, "category_id": 0, "iscrowd": 0,
           "segmentation": [[SIZE + 5, 10, SIZE + 25, 10, SIZE + 25, 30, SIZE + 5, 30]]}
    record = {"file_name": path, "height": SIZE, "width": SIZE, "image_id": 1,
              "annotations": [ann]}
    out = D2SegDatasetMapper(cfg, is_train=True)(record)
    assert len(out["instances"]) == 0
    return out


def _semantic_input(label):
    """A 64 px image whose label map is ``label`` everywhere (0: background only,
    255: ignored only)."""
    return {"image": torch.rand(3, SIZE, SIZE) * 255,
            "sem_seg": torch.full((SIZE, SIZE), label, dtype=torch.long)}


def _train_step(model, batch):
    """One training forward + backward; checks that the backward reaches some parameter and
    that every gradient is finite, and returns the loss dict."""
    model.zero_grad(set_to_none=True)
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "the backward reached no parameter"
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
    return losses


def test_every_shapes_config_is_covered():
    assert len(SHAPES_CONFIGS) >= 18 and "MEInst/meinst_R18_shapes.yaml" in SHAPES_CONFIGS


@pytest.mark.parametrize("config,extra", CASES, ids=[c + "".join(f"-{v}" for v in e[:1]) for c, e in CASES])
def test_trains_on_negatives(config, extra, tmp_path):
    """All-negative batch, then a batch mixing a negative with a positive image."""
    cfg = _cfg(config, tmp_path, extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    semantic = cfg.MODEL.META_ARCHITECTURE.endswith("SemanticSegmentor")
    if semantic:
        batches = {"background only": [_semantic_input(0), _semantic_input(0)],
                   "ignored only + background": [_semantic_input(255), _semantic_input(0)]}
    else:
        batches = {"no instances": [boxes_input(0), _clipped_away_input(cfg, tmp_path)],
                   "mixed": [boxes_input(0), boxes_input(3)]}
    for what, batch in batches.items():
        losses = _train_step(model, batch)
        bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v)}
        assert not bad, f"{config}, {what}: non-finite losses {bad}"
