"""MEInst's mask head on FCOS: losses (values, zero at the targets, gradients, variants),
batched decoding, inference with and without detections, config errors."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from d2seg.config import get_d2seg_cfg
from d2seg.meinst import (
    MaskEncoding,
    MaskEncodingError,
    MaskEncodingParams,
    MaskStatistics,
    code_loss,
    mask_targets_of_positives,
    save_encoding,
)

from conftest import CONFIGS

M, N = 8, 6


@pytest.fixture(scope="module")
def encoding_file(tmp_path_factory):
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    masks = []
    for _ in range(200):  # random discs and boxes, m x m
        c = torch.rand(2) * M
        r = 1 + torch.rand(1) * M / 2
        masks.append(((yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r ** 2).float())
        a, b = sorted(torch.randint(0, M, (2,)).tolist())
        box = torch.zeros(M, M)
        box[a:b + 1, :] = 1
        masks.append(box)
    stats = MaskStatistics(M, sigmoid=True)
    stats.update(torch.stack(masks))
    path = str(tmp_path_factory.mktemp("meinst") / "enc.npz")
    save_encoding(path, stats.fit(N, whiten=True))
    return path


def _cfg(encoding_file, *opts):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "MEInst", "meinst_R18_shapes.yaml"))
    cfg.merge_from_list([
        "MODEL.MEINST.MASK_SIZE", str(M), "MODEL.MEINST.DIM_MASK", str(N),
        "MODEL.MEINST.PATH_COMPONENTS", encoding_file, "MODEL.MEINST.ENCODING_DATASET", "",
        "MODEL.MEINST.NUM_MASK_CONVS", "2", "MODEL.FCOS.NUM_CLS_CONVS", "1", "MODEL.FCOS.NUM_BOX_CONVS", "1",
        "MODEL.FCOS.SIZES_OF_INTEREST", "[8, 16, 32, 64]",
    ] + list(opts))
    return cfg


def _inputs(size=64):
    torch.manual_seed(1)
    inst = Instances((size, size))
    inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0]]))
    inst.gt_classes = torch.tensor([0, 3])
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 6:40, 4:30] = True
    masks[0, 6:20, 4:12] = False
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks[1] = ((yy - 35) ** 2 / 15 ** 2 + (xx - 45) ** 2 / 15 ** 2) <= 1
    inst.gt_masks = BitMasks(masks)
    empty = Instances((size, size))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    empty.gt_masks = BitMasks(torch.zeros(0, size, size, dtype=torch.bool))
    img = lambda: torch.randint(0, 255, (3, size, size)).float()  # noqa: E731
    return [{"image": img(), "instances": inst}, {"image": img(), "instances": empty}]


def test_code_loss_values_and_zero_at_targets():
    torch.manual_seed(0)
    t = torch.randn(5, N)
    w = torch.rand(5)
    for kind in ("mse", "l1", "smooth_l1", "cosine"):
        assert code_loss(t.clone(), t, w, kind).item() == pytest.approx(0.0, abs=1e-6)
    p = t + 0.5
    assert code_loss(p, t, w, "mse").item() == pytest.approx((0.25 * N * w).sum().item() / (w.sum().item() * N))
    assert code_loss(p, t, w, "l1").item() == pytest.approx(0.5)
    assert code_loss(p, t, w, "smooth_l1").item() == pytest.approx(0.125)
    # no positives: exact zero with a graph
    z = code_loss(torch.zeros(0, N, requires_grad=True), torch.zeros(0, N), torch.zeros(0))
    assert z.item() == 0 and z.requires_grad
    with pytest.raises(ValueError, match="MASK_LOSS_TYPE"):
        code_loss(p, t, w, "huber")


def test_decode_batch_equals_per_instance(encoding_file):
    from d2seg.meinst import load_encoding

    enc = MaskEncoding.from_params(load_encoding(encoding_file))
    codes = torch.randn(7, N)
    batch = enc.decode(codes)
    single = torch.stack([enc.decode(c[None])[0] for c in codes])
    assert batch.shape == (7, M, M)
    assert torch.allclose(batch, single, atol=1e-6)
    assert enc.decode(torch.zeros(0, N)).shape == (0, M, M)
    # decode(v) = sigmoid(W v + mean) by hand
    w = enc.reconstruction()
    assert torch.allclose(batch.flatten(1), torch.sigmoid(codes @ w.t() + enc.means), atol=1e-6)


def test_head_loss_zero_when_codes_equal_targets(encoding_file):
    """With the predicted codes replaced by the encoded targets at the positives, the
    mask loss is 0; shifted by 1 it is exactly 1 (L2, centerness-weighted mean)."""
    model = build_model(_cfg(encoding_file))
    head = model.mask_head
    inputs = _inputs()
    gt = [x["instances"] for x in inputs]
    pos = Instances((64, 64))
    pos.im_inds = torch.tensor([0, 0, 0])
    pos.loc_inds = torch.tensor([3, 10, 40])
    pos.gt_inds = torch.tensor([0, 1, 1])
    pos.ctrness_targets = torch.tensor([0.2, 0.9, 0.5])
    targets = head.encoding.encode(mask_targets_of_positives(gt, pos.im_inds, pos.gt_inds, M))
    for shift, expected in ((0.0, 0.0), (1.0, 1.0)):
        codes = torch.zeros(2, 100, N)
        codes[pos.im_inds, pos.loc_inds] = targets + shift
        head.predict_codes = lambda feats, c=codes: c
        loss = head.losses(None, {}, SimpleNamespace(positives=pos), gt)["loss_mask"]
        assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_mask_targets_crop_the_gt_box():
    inputs = _inputs()
    gt = [x["instances"] for x in inputs]
    t = mask_targets_of_positives(gt, torch.tensor([0, 0]), torch.tensor([1, 0]), M)
    assert t.shape == (2, M, M)
    assert t[0].mean() > 0.6  # the ellipse fills most of its box
    assert t[1, 0, 0] == 0 and t[1, -1, -1] == 1  # notch at the top-left of box 0
    gt[0].remove("gt_masks")
    with pytest.raises(ValueError, match="MASK_ON"):
        mask_targets_of_positives(gt, torch.tensor([0]), torch.tensor([0]), M)


@pytest.mark.parametrize("opts", [
    [],
    ["MODEL.MEINST.USE_DEFORMABLE", "True", "MODEL.MEINST.USE_GCN_IN_MASK", "True",
     "MODEL.MEINST.GCN_KERNEL_SIZE", "5"],
    ["MODEL.MEINST.LOSS_ON_MASK", "True"],
    ["MODEL.MEINST.MASK_LOSS_TYPE", "cosine"],
])
def test_training_step_and_inference(encoding_file, opts):
    """One training step (an image with 2 instances, one with none) gives finite losses
    whose mask part sends gradients into the mask branch only through positives; in eval
    the detections get full-image masks, and zero detections work."""
    model = build_model(_cfg(encoding_file, *opts))
    model.train()
    losses = model(_inputs())
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() > 0
    losses["loss_mask"].backward()
    grads = [p.grad for p in model.mask_head.mask_pred.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.proposal_generator.fcos_head.cls_logits.parameters())
    assert not any(b.requires_grad for b in model.mask_head.encoding.buffers())

    model.eval()
    model.proposal_generator.score_thresh_test = 0.0  # untrained: keep 100 detections
    with torch.no_grad():
        out = model([{"image": x["image"], "height": 96, "width": 80} for x in _inputs()])
    for o in out:
        inst = o["instances"]
        assert len(inst) > 0
        assert inst.image_size == (96, 80)
        assert inst.pred_masks.shape == (len(inst), 96, 80)


def test_zero_detections(encoding_file):
    model = build_model(_cfg(encoding_file, "MODEL.FCOS.INFERENCE_TH_TEST", "1.1"))
    model.eval()
    with torch.no_grad():
        out = model([{"image": x["image"]} for x in _inputs()])
    assert [len(o["instances"]) for o in out] == [0, 0]
    assert out[0]["instances"].pred_masks.shape == (0, 64, 64)


def test_config_errors(encoding_file, tmp_path):
    with pytest.raises(MaskEncodingError, match="DIM_MASK=5"):
        build_model(_cfg(encoding_file, "MODEL.MEINST.DIM_MASK", "5"))
    with pytest.raises(MaskEncodingError, match="MASK_SIZE=28"):
        build_model(_cfg(encoding_file, "MODEL.MEINST.MASK_SIZE", "28"))
    with pytest.raises(FileNotFoundError, match="meinst_encoding.py"):
        build_model(_cfg(str(tmp_path / "nope.npz")))
    with pytest.raises(FileNotFoundError, match="ENCODING_DATASET"):
        build_model(_cfg("", "DATASETS.TRAIN", "()"))
    with pytest.raises(ValueError, match="SIGMOID"):
        build_model(_cfg(encoding_file, "MODEL.MEINST.LOSS_ON_MASK", "True", "MODEL.MEINST.SIGMOID", "False"))


def test_encoding_learnt_on_first_use_from_shapes(tmp_path, monkeypatch):
    """The shapes config learns the encoding from shapes_train (tiny) and caches it under
    $DETECTRON2_DATASETS/meinst/; the second build reads the cache."""
    from d2seg.meinst.learn import default_encoding_path, encoding_for_config

    cfg = _cfg("", "MODEL.MEINST.ENCODING_DATASET", "shapes_train", "D2SEG.SHAPES.NUM_TRAIN", "4",
               "D2SEG.SHAPES.NUM_VAL", "2", "D2SEG.SHAPES.IMAGE_SIZE", "64",
               "MODEL.MEINST.MASK_SIZE", "8", "MODEL.MEINST.DIM_MASK", "4")
    p1 = encoding_for_config(cfg)
    path = default_encoding_path(cfg)
    assert os.path.isfile(path) and "shapes_train_4_64px_s0_m8_n4" in os.path.basename(path)
    assert p1.dataset == "shapes_train" and p1.num_masks > 0
    mtime = os.path.getmtime(path)
    p2 = encoding_for_config(cfg)
    assert os.path.getmtime(path) == mtime
    np.testing.assert_allclose(p1.components, p2.components, atol=1e-6)


def _register_own_data(tmp_path, name, offsets):
    """A COCO file with one 64 px image per offset, each with a square and an L-shaped
    polygon (images are not read to learn an encoding), registered under ``name``."""
    import json

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2seg.data import register_coco_dataset

    images, anns = [], []
    for i, o in enumerate(offsets):
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 64, "width": 64})
        for poly in ([o, o, o + 20, o, o + 20, o + 20, o, o + 20],
                     [30, 30, 60, 30, 60, 40, 40, 40, 40, 60, 30, 60]):
            xs, ys = poly[0::2], poly[1::2]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                         "segmentation": [poly], "area": 1})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}]}))
    register_coco_dataset(name, str(path), str(tmp_path))
    return lambda: (DatasetCatalog.remove(name), MetadataCatalog.remove(name))


def test_encoding_follows_the_training_data(tmp_path, caplog):
    """With the shapes config on your own data, the encoding is learnt from DATASETS.TRAIN
    (not shapes_train), named in a log line, cached by a hash of the data (changed data:
    another file); an ENCODING_DATASET from other data is an error, an encoding file from
    other data a warning."""
    import logging

    from d2seg.meinst.learn import default_encoding_path, encoding_for_config

    unregister = _register_own_data(tmp_path, "_meinst_mine", [2, 4, 6])
    try:
        cfg = _cfg("", "DATASETS.TRAIN", "('_meinst_mine',)")
        with caplog.at_level(logging.INFO, logger="d2seg.meinst.learn"):
            params = encoding_for_config(cfg)
        path = default_encoding_path(cfg)
        assert params.dataset == "_meinst_mine" and params.num_masks == 6
        assert f"MEInst: mask encoding {path}: learnt from _meinst_mine (6 masks)" in caplog.text
        assert os.path.isfile(path)

        unregister()
        unregister = _register_own_data(tmp_path, "_meinst_mine", [2, 4, 6, 8])
        other = default_encoding_path(cfg)
        assert other != path and encoding_for_config(cfg).num_masks == 8

        with pytest.raises(MaskEncodingError, match=r"ENCODING_DATASET='shapes_train' is not among "
                                                    r"DATASETS.TRAIN=\('_meinst_mine',\)"):
            encoding_for_config(_cfg("", "DATASETS.TRAIN", "('_meinst_mine',)",
                                     "MODEL.MEINST.ENCODING_DATASET", "shapes_train"))
        # an explicit file from other data (e.g. a checkpoint's encoding) is used, with a warning
        foreign = str(tmp_path / "foreign.npz")
        save_encoding(foreign, MaskEncodingParams(params.components, params.explained_variance,
                                                  params.mean, M, True, True, 6, "shapes_train"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="d2seg.meinst.learn"):
            encoding_for_config(_cfg(foreign, "DATASETS.TRAIN", "('_meinst_mine',)"))
        assert (f"mask encoding {foreign} (MODEL.MEINST.PATH_COMPONENTS) was learnt from "
                "'shapes_train', not from DATASETS.TRAIN=('_meinst_mine',)") in caplog.text
    finally:
        unregister()


def test_encoding_is_learnt_by_each_machines_main_process(tmp_path, monkeypatch):
    """Several machines: the main process of a machine other than the first (local rank 0,
    not the global main process) learns the missing encoding itself, since the machines need
    not share DETECTRON2_DATASETS; the other processes of a machine wait and read it."""
    from detectron2.utils import comm

    from d2seg.meinst.learn import default_encoding_path, encoding_for_config

    unregister = _register_own_data(tmp_path, "_meinst_machine2", [2, 4])
    try:
        cfg = _cfg("", "DATASETS.TRAIN", "('_meinst_machine2',)")
        path = default_encoding_path(cfg)
        monkeypatch.setattr(comm, "synchronize", lambda: None)
        monkeypatch.setattr(comm, "is_main_process", lambda: False)
        monkeypatch.setattr(comm, "get_local_rank", lambda: 1)
        with pytest.raises(FileNotFoundError):  # another process of this machine: waits and reads
            encoding_for_config(cfg)
        monkeypatch.setattr(comm, "get_local_rank", lambda: 0)
        assert encoding_for_config(cfg).num_masks == 4 and os.path.isfile(path)
    finally:
        unregister()


def test_masks_without_variance_give_unscaled_codes():
    """Training masks that all fill their boxes (a data set whose masks are its boxes) have
    no variance: whitening would divide the targets' clamp noise by ~0 (codes ~1e6, a loss
    of ~1e12, then NaN); the codes are left unscaled instead, and encode -> decode still
    gives the mask back."""
    masks = torch.ones(6, M, M)
    stats = MaskStatistics(M, sigmoid=True)
    stats.update(masks)
    params = stats.fit(N, whiten=True)
    np.testing.assert_array_equal(params.scale(), np.ones(N))
    enc = MaskEncoding.from_params(params)
    torch.manual_seed(0)
    eps = (torch.rand(6, M * M) * 0.05).clamp(min=0.01)
    assert enc.encode(masks, eps).abs().max() < 50
    assert (enc.decode(enc.encode(masks)) >= 0.5).all()


def test_all_configs_merge():
    """Every configs/MEInst/*.yaml merges (no unknown key) and names the MEInst head;
    *_dcn configs put DCN in the last layer of all three towers."""
    import glob

    files = sorted(glob.glob(os.path.join(CONFIGS, "MEInst", "*.yaml")))
    assert len(files) == 14
    for f in files:
        cfg = get_d2seg_cfg()
        cfg.merge_from_file(f)
        assert cfg.MODEL.ONE_STAGE_MASK_HEAD.NAME == "MEInstMaskHead" and cfg.MODEL.MASK_ON
        dcn = f.endswith("_dcn.yaml")
        assert cfg.MODEL.FCOS.USE_DEFORMABLE == dcn and cfg.MODEL.MEINST.USE_DEFORMABLE == dcn
        assert (cfg.MODEL.MEINST.MASK_SIZE, cfg.MODEL.MEINST.DIM_MASK) == (28, 60)
        if "_3x" in f:
            assert cfg.SOLVER.MAX_ITER == 270000
