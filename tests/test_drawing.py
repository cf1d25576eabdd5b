"""d2seg.engine.drawing: the demo's picture equals Detectron2's ``draw_instance_predictions``
pixel for pixel, and drawing a large image does not copy its masks (issue 26, item 8)."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

from d2seg.engine.drawing import draw_instances, mask_polygons, render


def _instances(h, w, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes = []
    for i in range(n):
        x0, y0 = int(torch.randint(0, w - 20, (1,), generator=g)), int(torch.randint(0, h - 20, (1,), generator=g))
        x1, y1 = x0 + int(torch.randint(8, 20, (1,), generator=g)), y0 + int(torch.randint(8, 20, (1,), generator=g))
        masks[i, y0:y1, x0:x1] = True
        if i % 3 == 0:  # a hole
            masks[i, y0 + 3:y1 - 3, x0 + 3:x1 - 3] = False
        if i % 4 == 1:  # a second part
            masks[i, min(y1 + 2, h - 1):, :3] = True
        boxes.append([x0, y0, x1, y1])
    inst = Instances((h, w))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.pred_masks = masks
    inst.scores = torch.rand(n, generator=g)
    inst.pred_classes = torch.randint(0, 3, (n,), generator=g)
    return inst


def _both(inst, keep, image):
    meta = MetadataCatalog.get("__drawing_test")
    meta.thing_classes = ["a", "b", "c"]
    np.random.seed(3)
    ref = Visualizer(image, meta, instance_mode=ColorMode.IMAGE).draw_instance_predictions(
        inst[keep] if keep is not None else inst).get_image()
    np.random.seed(3)
    ours = draw_instances(Visualizer(image, meta, instance_mode=ColorMode.IMAGE), inst, keep).get_image()
    return ref, ours


@pytest.mark.parametrize("n", [0, 1, 9])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_picture_equals_detectron2s(n, threshold):
    image = np.random.RandomState(0).randint(0, 255, (72, 96, 3), dtype=np.uint8)
    inst = _instances(72, 96, n)
    keep = inst.scores >= threshold if threshold is not None else None
    ref, ours = _both(inst, keep, image)
    assert ref.shape == ours.shape
    assert np.array_equal(ref, ours)
    if n and (keep is None or keep.any()):
        assert not np.array_equal(ours, image)  # something was drawn


def test_without_boxes_falls_back_to_detectron2():
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    inst = _instances(40, 50, 3)
    inst.remove("pred_boxes")
    ref, ours = _both(inst, None, image)
    assert np.array_equal(ref, ours)


def test_polygons_are_traced_from_a_view():
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 10:30] = True
    mask[20, 0] = True  # a single pixel: too few points, left out
    polys = mask_polygons(mask)
    assert len(polys) == 1
    xs, ys = polys[0][0::2], polys[0][1::2]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10.5, 29.5, 5.5, 14.5)
    assert mask.sum() == 201  # the input is untouched


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from detectron2.data import MetadataCatalog
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from d2seg.benchmark.memory import PeakMemory
    from d2seg.engine.drawing import draw_instances, render

    h, w, n = 1000, 1500, 40
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes = []
    for i in range(n):
        x0, y0 = int(torch.randint(0, w - 300, (1,), generator=g)), int(torch.randint(0, h - 300, (1,), generator=g))
        masks[i, y0:y0 + 250, x0:x0 + 280] = True
        boxes.append([x0, y0, x0 + 280, y0 + 250])
    inst = Instances((h, w), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)), pred_masks=masks,
                     scores=torch.linspace(0.2, 1.0, n), pred_classes=torch.zeros(n, dtype=torch.long))
    image = np.zeros((h, w, 3), dtype=np.uint8)
    meta = MetadataCatalog.get("__drawing_memory")
    meta.thing_classes = ["a"]
    peak = PeakMemory("cpu")
    peak.start()  # resets the peak RSS (VmHWM)
    assert peak.method.startswith("peak RSS"), peak.method
    vis = Visualizer(image, meta, instance_mode=ColorMode.IMAGE)
    if sys.argv[1] == "d2seg":
        picture = render(draw_instances(vis, inst, inst.scores >= 0.1))
    else:
        picture = vis.draw_instance_predictions(inst[inst.scores >= 0.1]).get_image()
    print(json.dumps({"added_mib": peak.peak_mib(), "masks_mib": masks.numel() / 2**20,
                      "pixels": h * w}))
""")


def _hwm_resettable():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _hwm_resettable(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_drawing_does_not_copy_the_masks(tmp_path):
    """40 masks of 1000x1500 (57 MiB of bools): Detectron2's path adds about two copies of them
    (the selection copies the tensor, GenericMask keeps a uint8 copy of each) or matplotlib's
    rendering of the photo (about 110 bytes a pixel, 160 MiB), whichever peaks higher; d2seg's adds
    the polygons and its rendering (about 30 bytes a pixel) only."""
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    res = {}
    for how in ("d2seg", "detectron2"):
        out = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=300,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr[-3000:]
        res[how] = json.loads(out.stdout.strip().splitlines()[-1])
    masks = res["d2seg"]["masks_mib"]
    pixels_mib = res["d2seg"]["pixels"] / 2**20
    assert res["detectron2"]["added_mib"] > 1.5 * masks, res  # the copies this test guards against
    assert res["d2seg"]["added_mib"] < 0.2 * masks + 40 * pixels_mib, res


def test_render_equals_matplotlibs_picture_up_to_rounding():
    image = np.random.RandomState(1).randint(0, 255, (90, 120, 3), dtype=np.uint8)
    inst = _instances(90, 120, 12, seed=1)
    meta = MetadataCatalog.get("__drawing_test")
    meta.thing_classes = ["a", "b", "c"]
    vis = draw_instances(Visualizer(image, meta, instance_mode=ColorMode.IMAGE), inst)
    ours, theirs = render(vis), vis.get_image()
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == image.shape
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())
    assert (np.abs(theirs.astype(int) - image.astype(int)) > 10).mean() > 0.05  # the drawing is in the picture
    scaled = Visualizer(image, meta, instance_mode=ColorMode.IMAGE, scale=2.0).draw_box((5, 5, 50, 50))
    assert render(scaled).shape == (180, 240, 3)  # scaled pictures: matplotlib's own rendering


@pytest.mark.parametrize("holes", [False, True])
def test_semantic_picture_equals_detectron2s_up_to_rounding(holes):
    """draw_sem_seg: the regions with holes blended into the photo rather than laid over it as
    float32 layers; regions without holes drawn as Detectron2 draws them."""
    from d2seg.engine.drawing import draw_sem_seg

    image = np.random.RandomState(2).randint(0, 255, (80, 100, 3), dtype=np.uint8)
    sem = torch.zeros(80, 100, dtype=torch.long)
    sem[10:50, 20:70] = 1
    sem[60:75, 5:40] = 2
    if holes:
        sem[20:30, 30:40] = 0  # a hole in class 1
    sem[0:3, 90:100] = 7  # a label beyond the classes: not drawn
    meta = MetadataCatalog.get("__drawing_sem_test")
    meta.stuff_classes = ["bg", "a", "b"]
    meta.stuff_colors = [[10, 20, 30], [200, 50, 50], [50, 200, 50]]
    theirs = Visualizer(image, meta).draw_sem_seg(sem).get_image()
    vis = draw_sem_seg(Visualizer(image, meta), sem)
    ours = render(vis)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())
    assert (np.abs(theirs.astype(int) - image.astype(int)) > 10).mean() > 0.3  # the regions are drawn
    assert len(vis.ax.get_images()) == 1  # no full-size layer per class


def test_text_positions_equal_detectron2s():
    from d2seg.engine import drawing

    rng = np.random.RandomState(5)
    for _ in range(20):
        mask = (rng.rand(40, 50) > 0.6).astype(np.uint8)
        mask[5:30, 10:45] = 1
        calls = {}
        for name, fn in (("ours", lambda v, m: drawing._draw_text_in_mask(v, m, "t", (1, 1, 1))),
                         ("theirs", lambda v, m: v._draw_text_in_mask(m, "t", (1, 1, 1)))):
            vis = Visualizer(np.zeros((40, 50, 3), np.uint8))
            fn(vis, mask)
            calls[name] = [t.get_position() for t in vis.output.ax.texts]
        assert calls["ours"] == calls["theirs"] and calls["ours"]


def test_large_image_memory_script_runs(tmp_path):
    """dev/bench/large_image_memory.py end to end on one config and a small photo."""
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, os.path.join(repo, "dev", "bench", "large_image_memory.py"), "--configs",
                          "configs/quick/mask_rcnn_shapes.yaml", "--height", "300", "--width", "400",
                          "--drawing", "d2seg", "--json", str(out)], capture_output=True, text=True, cwd=repo,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["instances"] == 100, rows  # every threshold at 0: the cap
    assert rows[0]["need_mib"] == pytest.approx((100 * 300 * 400 + 300 * 400 * 3) / 2**20)
    assert "| configs/quick/mask_rcnn_shapes.yaml | d2seg | 100 |" in res.stdout
