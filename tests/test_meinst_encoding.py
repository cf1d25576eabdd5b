"""MEInst mask encoding: PCA fit, exact recovery of low-rank sets, reconstruction quality
as the tool reports it vs the training-time path, the file format and its errors, the
offline tool, AdelaiDet conversion."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances

from d2seg.meinst import (
    MaskEncoding,
    MaskEncodingError,
    MaskStatistics,
    load_encoding,
    mask_targets_of_positives,
    reconstruction_miou,
    save_encoding,
)
from d2seg.meinst.convert import convert_adelaidet_meinst
from d2seg.meinst.encoding import mask_iou
from d2seg.meinst.learn import crop_masks_of_record, iter_dataset_masks, learn_encoding

from conftest import TOOLS


def _ellipse_records(n_images=12, size=48, seed=0, rle=True):
    """Detectron2 dicts with 2-3 random ellipses each (RLE or polygon segmentations)."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[:size, :size]
    records = []
    for i in range(n_images):
        anns = []
        for _ in range(rng.randint(2, 4)):
            cx, cy = rng.uniform(12, size - 12, 2)
            ax, ay = rng.uniform(4, 11, 2)
            th = rng.uniform(0, np.pi)
            if rle:
                u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / ax
                v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / ay
                m = (u ** 2 + v ** 2 <= 1).astype(np.uint8)
                ys, xs = np.nonzero(m)
                bbox = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                seg = mask_util.encode(np.asfortranarray(m))
                seg["counts"] = seg["counts"].decode()
            else:
                t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
                px = cx + ax * np.cos(t) * np.cos(th) - ay * np.sin(t) * np.sin(th)
                py = cy + ax * np.cos(t) * np.sin(th) + ay * np.sin(t) * np.cos(th)
                seg = [np.stack([px, py], 1).ravel().tolist()]
                bbox = [px.min(), py.min(), px.max() - px.min(), py.max() - py.min()]
            anns.append({"bbox": [float(b) for b in bbox], "bbox_mode": BoxMode.XYWH_ABS,
                         "segmentation": seg, "category_id": 0, "iscrowd": 0})
        records.append({"file_name": f"img{i}.png", "height": size, "width": size,
                        "image_id": i, "annotations": anns})
    return records


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("sigmoid", [True, False])
def test_low_rank_set_recovered_exactly(whiten, sigmoid):
    """Masks that are copies of K = 5 binary patterns span a 4-dim centred space: with
    N >= 4 components encode -> decode is exact, with N = 1 it is not."""
    torch.manual_seed(0)
    m = 8
    base = (torch.rand(5, m, m) > 0.5).float()
    masks = base[torch.randint(0, 5, (200,))]
    stats = MaskStatistics(m, sigmoid)
    for chunk in masks.split(64):  # streaming in batches
        stats.update(chunk)
    assert stats.count == 200
    for n, exact in ((4, True), (6, True), (1, False)):
        enc = MaskEncoding.from_params(stats.fit(n, whiten)).double()
        rec = enc.decode(enc.encode(base.double()))
        iou = mask_iou(base >= 0.5, rec >= 0.5)
        if exact:
            assert torch.allclose(rec, base.double(), atol=0.011)  # clamp / sigmoid eps
            assert torch.all(iou == 1)
        else:
            assert iou.mean() < 0.99


def test_pca_matches_hand_computation():
    """Components are the covariance eigenvectors: projection T is orthonormal (no
    whitening), and the whitened codes of the training set have unit variance."""
    torch.manual_seed(1)
    masks = (torch.rand(300, 6, 6) > 0.3).float()
    stats = MaskStatistics(6, sigmoid=False)
    stats.update(masks)
    p = stats.fit(5, whiten=False)
    x = masks.reshape(300, -1).double().numpy()
    cov = np.cov(x, rowvar=False)
    evals = np.sort(np.linalg.eigvalsh(cov))[::-1][:5]
    np.testing.assert_allclose(p.explained_variance, evals, rtol=1e-8)
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(5), atol=1e-10)
    pw = stats.fit(5, whiten=True)
    codes = MaskEncoding.from_params(pw).double().encode(masks.double())
    np.testing.assert_allclose(codes.var(0, unbiased=True).numpy(), np.ones(5), rtol=1e-6)


def test_training_targets_reach_reported_reconstruction():
    """The tool's mIoU (records -> crops -> encoding) equals what the training path gets
    (Instances' BitMasks cropped by mask_targets_of_positives, float32 module)."""
    records = _ellipse_records()
    params = learn_encoding(records, mask_size=14, num_components=10)
    reported = reconstruction_miou(records, [params])[10]
    assert 0.8 < reported < 1.0

    enc = MaskEncoding.from_params(params)  # float32, as in the model
    ious = []
    for r in records:
        masks = [mask_util.decode(a["segmentation"]) for a in r["annotations"]]
        inst = Instances((r["height"], r["width"]))
        inst.gt_boxes = Boxes(torch.tensor([BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
                                            for a in r["annotations"]], dtype=torch.float32))
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)).bool())
        g = len(inst)
        t = mask_targets_of_positives([inst], torch.zeros(g, dtype=torch.long), torch.arange(g), 14)
        rec = enc.decode(enc.encode(t))
        ious.append(mask_iou(t >= 0.5, rec >= 0.5))
    train_miou = torch.cat(ious).mean().item()
    assert abs(train_miou - reported) < 2e-3


def test_polygons_and_rle_give_the_same_crops():
    """Polygon and RLE forms of one instance crop to nearly the same m x m mask."""
    rec_poly = _ellipse_records(n_images=1, seed=3, rle=False)[0]
    ann = rec_poly["annotations"][0]
    h = w = rec_poly["height"]
    rle = mask_util.frPyObjects(ann["segmentation"], h, w)
    rec_rle = dict(rec_poly, annotations=[dict(ann, segmentation=mask_util.merge(rle))])
    rec_poly = dict(rec_poly, annotations=[ann])
    a = crop_masks_of_record(rec_poly, 16)
    b = crop_masks_of_record(rec_rle, 16)
    assert a.shape == b.shape == (1, 16, 16)
    assert mask_iou(a > 0.5, b > 0.5).item() > 0.9


def test_streaming_batches_and_crowd_skipped():
    records = _ellipse_records(n_images=10)
    records[0]["annotations"][0]["iscrowd"] = 1
    total = sum(len(r["annotations"]) for r in records) - 1
    sizes = [len(b) for b in iter_dataset_masks(records, 8, batch_size=5)]
    assert sum(sizes) == total
    assert max(sizes) <= 5 + 3  # one image's instances at most over the batch size
    assert sum(len(b) for b in iter_dataset_masks(records, 8, max_masks=7)) == 7


def test_file_roundtrip_and_errors(tmp_path):
    records = _ellipse_records(n_images=6)
    params = learn_encoding(records, mask_size=10, num_components=8, whiten=True, sigmoid=True)
    path = str(tmp_path / "enc.npz")
    save_encoding(path, params)
    back = load_encoding(path, mask_size=10, num_components=8, whiten=True, sigmoid=True)
    np.testing.assert_allclose(back.components, params.components, atol=1e-6)
    assert back.num_masks == params.num_masks

    with pytest.raises(FileNotFoundError, match="PATH_COMPONENTS"):
        load_encoding(str(tmp_path / "missing.npz"), 10, 8)
    with pytest.raises(MaskEncodingError, match="MASK_SIZE=28"):
        load_encoding(path, mask_size=28, num_components=8)
    with pytest.raises(MaskEncodingError, match="DIM_MASK=60"):
        load_encoding(path, mask_size=10, num_components=60)
    with pytest.raises(MaskEncodingError, match="WHITEN"):
        load_encoding(path, whiten=False)
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip file")
    with pytest.raises(MaskEncodingError, match="cannot read"):
        load_encoding(str(bad), 10, 8)
    other = tmp_path / "other.npz"
    np.savez(other, foo=np.zeros(3))
    with pytest.raises(MaskEncodingError, match="missing keys"):
        load_encoding(str(other))
    old = tmp_path / "old.npz"
    with np.load(path) as f:
        d = dict(f)
    d["version"] = np.int64(99)
    np.savez(old, **d)
    with pytest.raises(MaskEncodingError, match="version 99"):
        load_encoding(str(old))
    d["version"] = np.int64(1)
    d["mean"] = np.zeros(7, np.float32)
    np.savez(old, **d)
    with pytest.raises(MaskEncodingError, match="inconsistent"):
        load_encoding(str(old))


def test_adelaidet_file_and_checkpoint_conversion(tmp_path):
    records = _ellipse_records(n_images=6)
    params = learn_encoding(records, mask_size=10, num_components=8)
    path = tmp_path / "adet.npz"
    np.savez(path, components_c=params.components[None], explained_variance_c=params.explained_variance[None],
             mean_c=params.mean[None])
    back = load_encoding(str(path), 10, 8, whiten=True, sigmoid=True)
    np.testing.assert_allclose(back.mean, params.mean)

    sd = {
        "backbone.bottom_up.stem.conv1.weight": torch.zeros(1),
        "proposal_generator.MEInst_head.cls_tower.0.weight": torch.ones(2),
        "proposal_generator.MEInst_head.scales.0.scale": torch.ones(1),
        "proposal_generator.MEInst_head.mask_tower.9.offset.weight": torch.ones(18, 4, 3, 3),
        "proposal_generator.MEInst_head.mask_tower.9.offset.bias": torch.ones(18),
        "proposal_generator.MEInst_head.mask_tower.9.conv.weight": torch.ones(4, 4, 3, 3),
        "proposal_generator.MEInst_head.mask_pred.conv_l1.conv.weight": torch.ones(3),
        "proposal_generator.mask_encoding.components": torch.from_numpy(params.components).float(),
        "proposal_generator.mask_encoding.explained_variances": torch.from_numpy(params.explained_variance).float(),
        "proposal_generator.mask_encoding.means": torch.from_numpy(params.mean).float(),
    }
    new, p2 = convert_adelaidet_meinst(sd)
    assert "backbone.bottom_up.stem.conv1.weight" in new
    assert "proposal_generator.fcos_head.cls_tower.0.weight" in new
    assert "proposal_generator.fcos_head.scales.0.scale" in new
    assert "mask_head.mask_pred.conv_l1.weight" in new
    assert new["mask_head.mask_tower.9.offset.weight"].shape == (27, 4, 3, 3)
    assert torch.sigmoid(new["mask_head.mask_tower.9.offset.bias"][18:]).min() > 1 - 1e-6
    assert torch.equal(new["mask_head.mask_tower.9.conv.bias"], torch.zeros(4))
    assert p2.mask_size == 10 and p2.num_components == 8
    # Loads into a MaskEncoding with the same buffer names.
    enc = MaskEncoding(10, 8)
    enc.load_state_dict({k.split(".")[-1]: v for k, v in new.items() if k.startswith("mask_head.encoding.")})


def test_tool_on_registered_dataset(tmp_path):
    """tools/meinst_encoding.py on a registered data set writes the .npz, the mIoU table
    (JSON) and the PNG; mIoU grows from few to many components."""
    sys.path.insert(0, TOOLS)
    import meinst_encoding

    name = "meinst_test_ellipses"
    records = _ellipse_records(n_images=10)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    out = str(tmp_path / "enc.npz")
    rc = meinst_encoding.main(["--dataset", name, "--mask-size", "12", "--num-components", "6",
                               "--eval-dims", "1,3,20", "--output", out])
    assert rc == 0
    p = load_encoding(out, 12, 6)
    assert p.dataset == name and p.num_masks == sum(len(r["annotations"]) for r in records)
    table = json.load(open(str(tmp_path / "enc_miou.json")))["miou"]
    assert set(table) == {"1", "3", "6", "20"}
    assert table["20"] > table["1"] and 0 < table["1"] <= 1
    assert os.path.getsize(str(tmp_path / "enc_miou.png")) > 1000
