"""The built-in synthetic `shapes` data set: generation, COCO validity, registration."""
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks
from pycocotools.coco import COCO

import d2seg  # noqa: F401  (registers shapes_train / shapes_val)
from d2seg.config import get_d2seg_cfg
from d2seg.data import (
    SHAPES_CLASSES,
    D2SegDatasetMapper,
    generate_shapes,
    prepare_datasets,
    register_shapes,
    render_image,
)
from d2seg.data.shapes import MIN_VISIBLE_AREA, shapes_paths

N, SIZE = 20, 64


def _digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(folder, "images"))):
        img = cv2.imread(os.path.join(folder, "images", name), cv2.IMREAD_UNCHANGED)
        h.update(name.encode() + img.tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    json_file, image_root = generate_shapes("train", N, SIZE, 0, root)
    return root, json_file, image_root


def test_generation_is_deterministic(small, tmp_path):
    root, json_file, _ = small
    other_json, _ = generate_shapes("train", N, SIZE, 0, str(tmp_path))
    with open(json_file, "rb") as a, open(other_json, "rb") as b:
        assert a.read() == b.read()
    assert _digest(os.path.dirname(json_file)) == _digest(os.path.dirname(other_json))

    diff_json, _ = generate_shapes("train", N, SIZE, 1, str(tmp_path))
    assert json.load(open(diff_json))["annotations"] != json.load(open(json_file))["annotations"]
    assert _digest(os.path.dirname(diff_json)) != _digest(os.path.dirname(json_file))


def test_second_call_reuses_files(small):
    root, json_file, _ = small
    mtime = os.path.getmtime(json_file)
    assert generate_shapes("train", N, SIZE, 0, root)[0] == json_file
    assert os.path.getmtime(json_file) == mtime
    assert [n for n in os.listdir(root) if ".tmp-" in n] == []  # no leftovers


def test_valid_coco_with_exact_visible_masks(small):
    _, json_file, image_root = small
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_file)
    assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == list(SHAPES_CLASSES)
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5]
    assert len(coco.getImgIds()) == N
    for img in coco.loadImgs(coco.getImgIds()):
        assert (img["height"], img["width"]) == (SIZE, SIZE)
        decoded = cv2.imread(os.path.join(image_root, img["file_name"]))
        assert decoded.shape == (SIZE, SIZE, 3)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= N  # 0-6 per image, ~3.5 on average
    for ann in anns:
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["iscrowd"] == 0
        m = coco.annToMask(ann).astype(bool)
        assert m.sum() >= MIN_VISIBLE_AREA
        assert m.sum() == ann["area"]
        ys, xs = np.nonzero(m)
        tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        np.testing.assert_allclose(ann["bbox"], tight)
    # visible masks of one image do not overlap
    for img_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
        if masks:
            assert np.stack(masks).sum(0).max() <= 1


def test_file_matches_rendering_and_occlusion_happens():
    occluded = 0
    classes = set()
    counts = []
    for i in range(40):
        image, instances = render_image(3, i, SIZE)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        counts.append(len(instances))
        for inst in instances:
            classes.add(inst.category)
            assert not (inst.visible & ~inst.full).any()  # visible part lies inside the shape
            occluded += int(inst.visible.sum() < inst.full.sum())
    assert occluded >= 5
    assert classes == set(range(len(SHAPES_CLASSES)))
    assert max(counts) <= 6 and np.mean(counts) > 2


def test_rendered_masks_are_what_is_written(small):
    _, json_file, _ = small
    data = json.load(open(json_file))
    for index in (0, 1, 2):
        _, instances = render_image(0, index, SIZE)
        anns = [a for a in data["annotations"] if a["image_id"] == index + 1]
        assert len(anns) == len(instances)
        for ann, inst in zip(anns, instances):
            assert ann["category_id"] == inst.category + 1
            assert (mask_util.decode(ann["segmentation"]).astype(bool) == inst.visible).all()


def test_empty_images_exist_in_a_large_set():
    # ~2% of images have no instance; over 400 renderings some must be empty.
    empty = sum(len(render_image(0, i, 32)[1]) == 0 for i in range(400))
    assert 1 <= empty <= 40


def test_object_size_scales_with_image_size():
    def mean_side(size):
        sides = []
        for i in range(30):
            for inst in render_image(5, i, size)[1]:
                ys, xs = np.nonzero(inst.full)
                sides.append(max(np.ptp(xs), np.ptp(ys)) + 1)
        return np.mean(sides)

    ratio = mean_side(128) / mean_side(64)
    assert 1.7 < ratio < 2.3


def test_register_shapes_gives_detectron2_records(tmp_path):
    name = "_test_shapes_reg"
    json_file, image_root = register_shapes(name, "train", N, SIZE, 0, root=str(tmp_path))
    assert not os.path.exists(json_file)  # lazy
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco"
    assert meta.json_file == json_file and meta.image_root == image_root
    assert meta.thing_classes == list(SHAPES_CLASSES)
    records = DatasetCatalog.get(name)
    assert os.path.isfile(json_file)
    assert len(records) == N
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    rec = next(r for r in records if r["annotations"])
    assert os.path.isfile(rec["file_name"]) and rec["height"] == SIZE
    segs = [a["segmentation"] for a in rec["annotations"]]
    bm = np.stack([mask_util.decode(s) for s in segs])
    assert bm.shape == (len(segs), SIZE, SIZE)
    assert all(0 <= a["category_id"] < 5 for a in rec["annotations"])

    # the mapper turns it into bitmask Instances
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "Base-Shapes.yaml"))
    out = D2SegDatasetMapper(cfg, is_train=True)(rec)
    inst = out["instances"]
    assert isinstance(inst.gt_masks, BitMasks)
    # Base-Shapes resizes to 128 px: image and masks follow
    assert len(inst) == len(segs) and out["image"].shape == (3, 128, 128)
    assert inst.gt_masks.tensor.shape == (len(segs), 128, 128)
    areas = inst.gt_masks.tensor.sum((1, 2)).float()
    expected = 4 * bm.reshape(len(segs), -1).sum(1)  # x2 per side
    np.testing.assert_allclose(areas.numpy(), expected, rtol=0.15)

    # re-registering with other parameters replaces the registration
    json2, _ = register_shapes(name, "train", N + 2, SIZE, 0, root=str(tmp_path))
    assert MetadataCatalog.get(name).json_file == json2 != json_file
    assert len(DatasetCatalog.get(name)) == N + 2
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_builtin_registration_does_not_generate():
    assert "shapes_train" in DatasetCatalog.list() and "shapes_val" in DatasetCatalog.list()
    tr, va = MetadataCatalog.get("shapes_train"), MetadataCatalog.get("shapes_val")
    assert tr.evaluator_type == va.evaluator_type == "coco"
    assert tr.shapes_params["seed"] != va.shapes_params["seed"]
    assert (tr.shapes_params["num_images"], va.shapes_params["num_images"]) == (600, 100)


def test_prepare_datasets_uses_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    cfg = get_d2seg_cfg()
    cfg.DATASETS.TRAIN = ("shapes_train",)
    cfg.DATASETS.TEST = ("shapes_val",)
    cfg.D2SEG.SHAPES.NUM_TRAIN, cfg.D2SEG.SHAPES.NUM_VAL = 12, 5
    cfg.D2SEG.SHAPES.IMAGE_SIZE, cfg.D2SEG.SHAPES.SEED = 48, 7
    try:
        prepared = prepare_datasets(cfg)
        assert set(prepared) == {"shapes_train", "shapes_val"}
        _, tj, _ = shapes_paths(str(tmp_path), "train", 12, 48, 7)
        _, vj, _ = shapes_paths(str(tmp_path), "val", 5, 48, 8)
        assert prepared == {"shapes_train": tj, "shapes_val": vj}
        assert os.path.isfile(tj) and os.path.isfile(vj)  # generated now, not lazily
        assert MetadataCatalog.get("shapes_train").json_file == tj
        train, val = DatasetCatalog.get("shapes_train"), DatasetCatalog.get("shapes_val")
        assert (len(train), len(val)) == (12, 5)
        assert train[0]["height"] == 48
        # held out: val images differ from train images
        assert _digest(os.path.dirname(tj)) != _digest(os.path.dirname(vj))
    finally:
        monkeypatch.delenv("DETECTRON2_DATASETS")
        d2seg.data.register_builtin_shapes()  # restore defaults for other tests


def _generate_in_child(root, out):
    json_file, _ = generate_shapes("train", 30, SIZE, 11, root)
    out.put(json_file)


def test_concurrent_generation_leaves_one_valid_set(tmp_path):
    # fork: both children start at once, so they really race for the rename
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_generate_in_child, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = {q.get(timeout=5) for _ in procs}
    assert len(results) == 1
    json_file = results.pop()
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(os.path.dirname(json_file))]
    data = json.load(open(json_file))
    assert len(data["images"]) == 30
    assert len(os.listdir(os.path.join(os.path.dirname(json_file), "images"))) == 30
    ref, _ = generate_shapes("train", 30, SIZE, 11, str(tmp_path / "ref"))
    assert open(ref, "rb").read() == open(json_file, "rb").read()


def test_losing_the_rename_race_keeps_the_winner(tmp_path, monkeypatch):
    """Another process finishes first while this one writes: its copy is kept, ours is
    deleted, no error."""
    import d2seg.data.shapes as shapes_mod

    real_write = shapes_mod._write_files
    calls = []

    def write_then_lose(folder, *args):
        real_write(folder, *args)
        if not calls:  # the "other process" finishes its data set meanwhile
            calls.append(folder)
            monkeypatch.setattr(shapes_mod, "_write_files", real_write)
            generate_shapes("val", 6, 32, 2, str(tmp_path))

    monkeypatch.setattr(shapes_mod, "_write_files", write_then_lose)
    json_file, _ = generate_shapes("val", 6, 32, 2, str(tmp_path))
    assert calls and os.path.isfile(json_file)
    assert os.listdir(tmp_path) == [os.path.basename(os.path.dirname(json_file))]
    assert len(json.load(open(json_file))["images"]) == 6


def test_coco_evaluator_scores_ground_truth_as_perfect(tmp_path):
    """Detectron2's COCOEvaluator reads the generated json; predicting the ground truth
    itself gives 100 box and mask AP."""
    import torch
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances

    name = "_test_shapes_eval"
    register_shapes(name, "val", N, SIZE, 4, root=str(tmp_path))
    records = DatasetCatalog.get(name)
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"), tasks=("bbox", "segm"))
    evaluator.reset()
    for rec in records:
        anns = rec["annotations"]
        inst = Instances((SIZE, SIZE))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        masks = [mask_util.decode(a["segmentation"]) for a in anns]
        inst.pred_masks = torch.from_numpy(
            np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), np.uint8)
        ).bool()
        evaluator.process([{"image_id": rec["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_semantic_form_matches_instances_and_scores_perfectly(tmp_path):
    import torch
    from detectron2.evaluation import SemSegEvaluator

    from d2seg.data import SEM_SEG_CLASSES, register_shapes_sem_seg, render_semantic_labels

    name, inst_name = "_test_shapes_sem", "_test_shapes_sem_inst"
    image_root, label_root = register_shapes_sem_seg(name, "val", N, SIZE, 4, root=str(tmp_path))
    register_shapes(inst_name, "val", N, SIZE, 4, root=str(tmp_path))
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
    assert meta.stuff_classes == ["background", *SHAPES_CLASSES] == list(SEM_SEG_CLASSES)
    records = DatasetCatalog.get(name)
    inst_records = DatasetCatalog.get(inst_name)
    assert [r["file_name"] for r in records] == [r["file_name"] for r in inst_records]
    ignored = 0
    for rec, irec in zip(records, inst_records):
        labels = cv2.imread(rec["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
        assert labels.shape == (SIZE, SIZE) and labels.dtype == np.uint8
        expected = np.zeros((SIZE, SIZE), np.uint8)
        for a in irec["annotations"]:
            expected[mask_util.decode(a["segmentation"]).astype(bool)] = a["category_id"] + 1
        known = labels != 255
        ignored += int((~known).sum())
        assert (labels[known] == expected[known]).all()
        assert (expected[~known] == 0).all()  # ignore only where no annotation is
        np.testing.assert_array_equal(labels, render_semantic_labels(4, rec["image_id"] - 1, SIZE))
    assert ignored > 0  # some tiny fragments exist among 20 images

    # through the mapper (test mode keeps nothing, train mode gives sem_seg)
    cfg = get_d2seg_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (SIZE,), SIZE
    out = D2SegDatasetMapper(cfg, is_train=True)(records[0])
    assert out["sem_seg"].shape == (SIZE, SIZE) and out["sem_seg"].dtype == torch.long
    assert "instances" not in out

    # Detectron2's SemSegEvaluator: the ground truth as prediction gives mIoU 100
    evaluator = SemSegEvaluator(name, distributed=False, output_dir=None)
    evaluator.reset()
    for rec in records:
        labels = cv2.imread(rec["sem_seg_file_name"], cv2.IMREAD_UNCHANGED).astype(np.int64)
        labels[labels == 255] = 0
        logits = torch.nn.functional.one_hot(torch.from_numpy(labels), len(SEM_SEG_CLASSES))
        evaluator.process([{"file_name": rec["file_name"]}],
                          [{"sem_seg": logits.permute(2, 0, 1).float()}])
    res = evaluator.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0)
    for n in (name, inst_name):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_prepare_datasets_semantic_names(tmp_path, monkeypatch):
    from d2seg.data.shapes import shapes_sem_seg_paths

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    cfg = get_d2seg_cfg()
    cfg.DATASETS.TRAIN = ("shapes_sem_seg_train",)
    cfg.DATASETS.TEST = ("shapes_sem_seg_val",)
    cfg.D2SEG.SHAPES.NUM_TRAIN, cfg.D2SEG.SHAPES.NUM_VAL = 6, 4
    cfg.D2SEG.SHAPES.IMAGE_SIZE = 32
    try:
        prepared = prepare_datasets(cfg)
        _, lt = shapes_sem_seg_paths(str(tmp_path), "train", 6, 32, 0)
        _, lv = shapes_sem_seg_paths(str(tmp_path), "val", 4, 32, 1)
        assert prepared == {"shapes_sem_seg_train": lt, "shapes_sem_seg_val": lv}
        assert len(os.listdir(lt)) == 6 and len(os.listdir(lv)) == 4
        assert len(DatasetCatalog.get("shapes_sem_seg_val")) == 4
    finally:
        monkeypatch.delenv("DETECTRON2_DATASETS")
        d2seg.data.register_builtin_shapes()
