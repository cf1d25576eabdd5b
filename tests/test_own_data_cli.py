"""Your own data the way a user meets it: a whole ``tools/train_net.py`` run on a small,
partly broken COCO file registered with ``--register-coco`` (docs/own_data.md), its final
COCO evaluation, ``--eval-only`` on its checkpoint; the command-line errors of train_net.py
and the demo's output names."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import CONFIGS, REPO, TOOLS, load_script, square_polygon, tiny_opts

MASK_RCNN = os.path.join(CONFIGS, "quick", "mask_rcnn_shapes.yaml")
SIZE = 64


def _run(args, timeout=600):
    return subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _broken_coco(folder, without_area=True):
    """4 images of 64 px with a bright square each (category 1) and, on the even ones, a
    dark one (category 2); plus what real files hold: a polygon of 2 points, a box right of
    the image, a box larger than the image, a crowd region, and (``without_area``) an
    annotation without 'area' (COCOeval raises KeyError: 'area' on it)."""
    rng = np.random.default_rng(0)
    images, anns = [], []

    def add(image_id, cat, bbox, segm, **extra):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                     "segmentation": segm, "iscrowd": 0, "area": bbox[2] * bbox[3], **extra})

    for i in range(4):
        img = rng.integers(60, 120, (SIZE, SIZE, 3)).astype(np.uint8)
        x, y = 6 + 4 * i, 8
        img[y:y + 24, x:x + 24] = 230
        add(i + 1, 1, [x, y, 24, 24], [square_polygon(x, y, 24)])
        if i % 2 == 0:
            img[40:58, 36:54] = 10
            add(i + 1, 2, [36, 40, 18, 18], [square_polygon(36, 40, 18)])
        cv2.imwrite(os.path.join(folder, f"{i}.jpg"), img)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": SIZE, "width": SIZE})
    add(1, 2, [10, 10, 10, 10], [[10, 10, 20, 20]])                   # 2 points: pycocotools' 'bb' error
    add(2, 1, [80, 10, 10, 10], [square_polygon(80, 10, 10)])                # right of the image
    add(3, 1, [-8, -8, 90, 90], [square_polygon(-8, -8, 90)], iscrowd=1)     # larger than the image, crowd
    add(4, 2, [30, 30, 10, 10], [square_polygon(30, 30, 10)])
    if without_area:
        del anns[-1]["area"]
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": 1, "name": "bright"}, {"id": 2, "name": "dark"}]}, f)
    return path, len(anns)


def _summary(json_file, n_anns):
    """The loader's line for the file of :func:`_broken_coco` (registered as 'mine')."""
    return (f"'mine' ({json_file}): 4 images, {n_anns} annotations, {n_anns - 2} kept; dropped 2 "
            f"of {n_anns} annotations (1 x box outside the image, 1 x empty or invalid polygon "
            "(fewer than 3 points)); changed 1 (1 x box and mask clipped to the image); 1 crowd")


def _opts(json_file, out, max_iter=2):
    return ["DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "('mine',)",
            "MODEL.ROI_HEADS.NUM_CLASSES", "2"] + tiny_opts(out, max_iter=max_iter,
                                                            SOLVER__CHECKPOINT_PERIOD=1000)


def test_training_and_its_final_evaluation_on_a_broken_coco_file(tmp_path, caplog):
    """In process, as tools/train_net.py runs it: the Trainer trains on the registered
    file and evaluates at its end (COCOEvaluator on the annotations the loader kept: the
    polygon of 2 points made pycocotools raise "Argument 'bb' has incorrect type"), then
    Trainer.test evaluates again (what --eval-only runs). Every annotation has its 'area'
    here, so that the 'bb' error is the one a plain COCOEvaluator meets."""
    import logging

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2seg.data import register_coco_dataset
    from d2seg.engine import Trainer, setup_cfg

    data = tmp_path / "data"
    data.mkdir()
    json_file, n_anns = _broken_coco(str(data), without_area=False)
    register_coco_dataset("mine", json_file, str(data))
    try:
        cfg = setup_cfg(MASK_RCNN, _opts(json_file, tmp_path / "out"))
        with caplog.at_level(logging.INFO):
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=False)
            trainer.train()
        assert _summary(json_file, n_anns) in caplog.text
        assert f"Evaluating mine on the {n_anns - 2} annotations the loader kept" in caplog.text
        final = trainer._last_eval_results
        assert set(final) == {"bbox", "segm"} and all(0 <= final[t]["AP"] <= 100 for t in final)
        again = Trainer.test(cfg, trainer.model)
        assert set(again) == {"bbox", "segm"}
    finally:
        DatasetCatalog.remove("mine")
        MetadataCatalog.remove("mine")


@pytest.mark.slow
def test_train_net_on_a_broken_coco_file(tmp_path):
    """The same as a user runs it: tools/train_net.py with --register-coco (docs/own_data.md),
    training with the final evaluation, then --eval-only on its checkpoint (two processes:
    about 20 s on a free machine, over a minute on a loaded one)."""
    data = tmp_path / "data"
    data.mkdir()
    json_file, n_anns = _broken_coco(str(data))
    register = ["--register-coco", "mine", json_file, str(data)]
    out = tmp_path / "out"
    res = _run([os.path.join(TOOLS, "train_net.py"), "--config-file", MASK_RCNN] + register
               + _opts(json_file, out))
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert _summary(json_file, n_anns) in log, log[-4000:]
    assert f"Evaluating mine on the {n_anns - 2} annotations the loader kept" in log
    for task in ("bbox", "segm"):
        assert re.search(rf"copypaste: Task: {task}\n.*copypaste: AP,AP50.*\n.*copypaste: [0-9.nan]+,", log)

    res = _run([os.path.join(TOOLS, "train_net.py"), "--config-file", MASK_RCNN, "--eval-only"]
               + register + _opts(json_file, tmp_path / "eval")
               + ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "Evaluation results for segm" in log

    # the demo on a folder with photo.jpg, photo.png and a 16-bit grayscale PNG: three
    # results, and the 16-bit one drawn from its scaled pixels, not saturated to white
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("photo.jpg", "photo.png"):
        cv2.imwrite(str(photos / name), cv2.imread(os.path.join(str(data), "0.jpg")))
    ramp = np.tile(np.linspace(0, 65535, SIZE).astype(np.uint16), (SIZE, 1))
    cv2.imwrite(str(photos / "deep.png"), ramp)
    res = _run([os.path.join(TOOLS, "demo.py"), "--config-file", MASK_RCNN] + register
               + ["--input", str(photos), "--output", str(tmp_path / "demo"),
                  "--confidence-threshold", "1.01", "--opts"] + _opts(json_file, tmp_path / "o")
               + ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert sorted(os.listdir(tmp_path / "demo")) == ["deep.png", "photo_jpg.png", "photo_png.png"]
    deep = cv2.imread(str(tmp_path / "demo" / "deep.png"), cv2.IMREAD_GRAYSCALE).astype(float)
    assert np.abs(deep - ramp.astype(float) * 255 / 65535).mean() < 3


def test_flag_after_key_value_pairs_says_so(capsys):
    parse_args = load_script("tools/train_net.py").parse_args
    with pytest.raises(SystemExit) as info:
        parse_args(["--config-file", MASK_RCNN, "SOLVER.MAX_ITER", "3", "--resume"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage:" in err
    assert "--resume is placed after the KEY VALUE config overrides (SOLVER.MAX_ITER 3 ...)" in err
    args = parse_args(["--config-file", MASK_RCNN, "--resume", "SOLVER.MAX_ITER", "3"])
    assert args.resume and args.opts == ["SOLVER.MAX_ITER", "3"]
    # the demo's --opts likewise
    with pytest.raises(SystemExit):
        load_script("tools/demo.py").main(["--config-file", MASK_RCNN, "--input", "x.jpg", "--output", "o",
                            "--opts", "MODEL.WEIGHTS", "w.pth", "--scale", "2"])
    assert "--scale is placed after the --opts KEY VALUE config overrides" in capsys.readouterr().err


def test_demo_keeps_results_of_inputs_with_the_same_stem():
    demo = load_script("tools/demo.py")
    paths = ["in/photo.jpg", "in/photo.png", "in/other.jpg", "a/x.jpg", "b/x.jpg", "in/Photo.JPG"]
    names = demo.output_names(paths)
    assert len(set(names)) == len(names)
    assert names[:3] == ["photo_jpg.png", "photo_png.png", "other.png"]
    assert names[3] != names[4] and all(n.endswith(".png") for n in names)
