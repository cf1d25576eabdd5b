"""SOLO's pieces against hand computations: grid assignment, mask targets, Dice loss,
point NMS, dynamic kernels, and AdelaiDet-compatible parameter names."""
import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances

from d2seg.solo.inference import point_nms
from d2seg.solo.kernels import dynamic_kernel_product_torch
from d2seg.solo.losses import category_focal_loss, dice_loss
from d2seg.solo.targets import assign_grid_targets, center_of_mass, mask_targets_at

GRIDS = [20, 16, 12, 8, 6]
RANGES = [(1, 24), (12, 48), (24, 96), (48, 192), (96, 2048)]


def _instances(rects, classes, size=(128, 128), with_boxes=True):
    """rects: (y0, y1, x0, x1) half-open pixel ranges of filled rectangles."""
    m = torch.zeros((len(rects),) + size, dtype=torch.bool)
    for k, (y0, y1, x0, x1) in enumerate(rects):
        m[k, y0:y1, x0:x1] = True
    inst = Instances(size)
    inst.gt_masks = BitMasks(m)
    if with_boxes:
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def _cells(t, img=0):
    """{(row, col): gt} of one image's positives at one level."""
    S = t.cate_labels.shape[-1]
    sel = t.pos_img == img
    return {(int(c) // S, int(c) % S): int(g) for c, g in zip(t.pos_cell[sel], t.pos_gt[sel])}


def test_center_of_mass_hand():
    m = torch.zeros(1, 10, 10)
    m[0, 2:4, 6:10] = 1  # rows 2,3 -> centers 2.5, 3.5; cols 6..9 -> 6.5..9.5
    cx, cy = center_of_mass(m)
    assert cx.item() == pytest.approx(8.0) and cy.item() == pytest.approx(3.0)


def test_grid_assignment_cells_and_levels():
    # A: 16x16 square centred at (16, 16): sqrt(area) 16 -> levels 0 and 1.
    # B: 60 wide x 80 tall, centre (60, 80): sqrt(area) 69.3 -> levels 2 and 3.
    inst = _instances([(8, 24, 8, 24), (40, 120, 30, 90)], [1, 3])
    t = assign_grid_targets([inst], (128, 128), GRIDS, RANGES, 0.2, num_classes=5)
    # Level 0 (S=20, cell 6.4 px): centre cell 2, region 16 +- 1.6 px -> cells 2..2.
    assert _cells(t[0]) == {(2, 2): 0}
    # Level 1 (S=16, cell 8 px): centre cell 2, region [14.4, 17.6] -> cells 1..2.
    assert _cells(t[1]) == {(r, c): 0 for r in (1, 2) for c in (1, 2)}
    # Level 2 (S=12): x 60 +- 6 -> cols 5..6; y 80 +- 8 -> rows 6..8 (cell 10.67 px).
    assert _cells(t[2]) == {(r, c): 1 for r in (6, 7, 8) for c in (5, 6)}
    # Level 3 (S=8, cell 16 px): cols 3..4, rows 4..5.
    assert _cells(t[3]) == {(r, c): 1 for r in (4, 5) for c in (3, 4)}
    assert _cells(t[4]) == {}
    # Category maps: owners' classes, background (= num_classes) elsewhere.
    assert t[2].cate_labels[0, 6:9, 5:7].eq(3).all()
    assert t[2].cate_labels.eq(3).sum() == 6 and t[2].cate_labels.eq(5).sum() == 144 - 6
    assert t[0].cate_labels[0, 2, 2] == 1


def test_center_region_clamped_to_3x3_and_boxes_from_masks():
    inst = _instances([(40, 120, 30, 90)], [2], with_boxes=False)
    t = assign_grid_targets([inst], (128, 128), GRIDS, RANGES, sigma=1.0, num_classes=5)
    # Level 2: centre cell (7, 5); the full box would span rows 3..11, cols 2..8.
    assert _cells(t[2]) == {(r, c): 0 for r in (6, 7, 8) for c in (4, 5, 6)}


def test_smaller_instance_wins_shared_cells_and_empty_masks_ignored():
    # D: 24x24 at the corner (levels 0, 1); E: 8x8 inside it (level 0). Same cells on level 0.
    inst = _instances([(0, 24, 0, 24), (8, 16, 8, 16), (0, 0, 0, 0)], [0, 4, 2])
    inst.gt_boxes = Boxes(torch.tensor([[0, 0, 24, 24], [8, 8, 16, 16], [50, 50, 60, 60.]]))
    t = assign_grid_targets([inst], (128, 128), GRIDS, RANGES, 0.2, num_classes=5)
    assert _cells(t[0]) == {(r, c): 1 for r in (1, 2) for c in (1, 2)}
    assert set(_cells(t[1]).values()) == {0}
    assert all(2 not in _cells(x).values() for x in t)  # the empty mask owns nothing


def test_grid_assignment_zero_instances_and_batch_index():
    empty = _instances([], [])
    one = _instances([(8, 24, 8, 24)], [1])
    t = assign_grid_targets([empty, one], (128, 128), GRIDS, RANGES, 0.2, num_classes=5)
    assert t[0].cate_labels.shape == (2, 20, 20)
    assert t[0].cate_labels[0].eq(5).all()
    assert t[0].pos_img.tolist() == [1] and t[0].pos_cell.tolist() == [2 * 20 + 2]
    t = assign_grid_targets([empty], (128, 128), GRIDS, RANGES, 0.2, num_classes=5)
    assert sum(len(x.pos_img) for x in t) == 0


def test_grid_assignment_rejects_bad_class():
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        assign_grid_targets([_instances([(8, 24, 8, 24)], [7])], (128, 128), GRIDS, RANGES,
                            0.2, num_classes=5)


def test_mask_targets_area_average_and_padding():
    inst = _instances([(0, 2, 0, 3)], [0], size=(4, 6))  # padded to 8 x 8 below
    tgt = mask_targets_at([inst], (8, 8), (4, 4), torch.tensor([0]), torch.tensor([0]))
    expected = torch.zeros(4, 4)
    expected[0, 0] = 1.0
    expected[0, 1] = 0.5  # pixel columns 2, 3: one of two covered
    assert torch.allclose(tgt[0], expected)


def test_center_of_mass_adelaidet_pixel_indices():
    m = torch.zeros(1, 10, 10)
    m[0, 2:4, 6:10] = 1  # rows 2, 3 -> 2.5; cols 6..9 -> 7.5 (pixel i at i, AdelaiDet)
    cx, cy = center_of_mass(m, pixel_offset=0.0)
    assert cx.item() == pytest.approx(7.5) and cy.item() == pytest.approx(2.5)


def test_adelaidet_center_half_a_pixel_lower_on_a_boundary():
    # rows [28, 38): centre 33 (pixel centres) or 32.5 (AdelaiDet), region +- 0.1 * 10 = 1 px:
    # [32, 34] or [31.5, 33.5]; 32 is the boundary of rows 3 and 4 of level 1 (S=16, 8 px
    # cells). Columns [8, 32): centre 20 (19.5) +- 2.4 px, inside column 2.
    inst = _instances([(28, 38, 8, 32)], [1])
    ours = assign_grid_targets([inst], (128, 128), GRIDS, RANGES, 0.2, num_classes=5)
    ref = assign_grid_targets([inst], (128, 128), GRIDS, RANGES, 0.2, num_classes=5, center="adelaidet")
    assert _cells(ours[1]) == {(4, 2): 0}
    assert _cells(ref[1]) == {(3, 2): 0, (4, 2): 0}


def test_later_instance_wins_shared_cells_and_keeps_duplicates():
    # as test_smaller_instance_wins_...: E (8x8) inside D (24x24), shared cells on level 0
    inst = _instances([(0, 24, 0, 24), (8, 16, 8, 16)], [0, 4])
    t = assign_grid_targets([inst], (128, 128), GRIDS, RANGES, 0.2, num_classes=5, conflict="later")
    # level 0: D claims rows/cols 1..2, then E claims the same cells: E's class, both targets
    pairs = sorted(zip(t[0].pos_cell.tolist(), t[0].pos_gt.tolist()))
    cells = [r * 20 + c for r in (1, 2) for c in (1, 2)]
    assert pairs == sorted([(c, 0) for c in cells] + [(c, 1) for c in cells])
    assert t[0].cate_labels[0, 1:3, 1:3].eq(4).all() and t[0].cate_labels.ne(5).sum() == 4
    # D first, E second: E (the later one) also wins with "smaller"; reversed, only "later" differs
    inst_rev = _instances([(8, 16, 8, 16), (0, 24, 0, 24)], [4, 0])
    later = assign_grid_targets([inst_rev], (128, 128), GRIDS, RANGES, 0.2, 5, conflict="later")
    smaller = assign_grid_targets([inst_rev], (128, 128), GRIDS, RANGES, 0.2, 5)
    assert later[0].cate_labels[0, 1:3, 1:3].eq(0).all()
    assert smaller[0].cate_labels[0, 1:3, 1:3].eq(4).all()


def test_mask_targets_bilinear_adelaidet():
    # 8 x 12 mask, scale 1/4 -> 2 x 3 samples at pixel (4i + 1.5, 4j + 1.5): the average of
    # the 2 x 2 pixels rows 4i+1..4i+2, cols 4j+1..4j+2, rounded half up
    inst = _instances([(0, 2, 0, 6)], [0], size=(8, 12))  # rows 0, 1; cols 0..5
    tgt = mask_targets_at([inst], (16, 16), (4, 4), torch.tensor([0]), torch.tensor([0]),
                          downsample="bilinear")
    expected = torch.zeros(4, 4)  # the 2 x 3 result sits top-left in the 4 x 4 map
    expected[0, 0] = 1.0  # rows 1..2 (row 1 set) x cols 1..2 (both set): 2 of 4 -> 1
    expected[0, 1] = 0.0  # rows 1..2 x cols 5..6 (col 5 set): 1 of 4 -> 0
    assert torch.equal(tgt[0], expected)
    with pytest.raises(ValueError, match="MASK_TARGET_DOWNSAMPLE"):
        mask_targets_at([inst], (16, 16), (4, 4), torch.tensor([0]), torch.tensor([0]), downsample="x")


def test_dice_loss_hand_computation():
    p = torch.tensor([[[0.5, 1.0], [0.0, 0.25]]])
    q = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # sum(pq) = 1.5; sum(p^2) = 1.3125; sum(q^2) = 2; eps = 1e-3 on each squared sum
    assert dice_loss(p, q).item() == pytest.approx(1 - 3.0 / 3.3145, abs=1e-6)
    assert dice_loss(q, q).item() == pytest.approx(0.0, abs=1e-3)
    assert dice_loss(q, 1 - q).item() == pytest.approx(1.0)
    # gradient pushes predictions towards the target
    p = p.clone().requires_grad_(True)
    dice_loss(p, q).sum().backward()
    assert p.grad[0, 0, 0] < 0 and p.grad[0, 1, 1] > 0


def test_category_focal_loss_normalised_by_positives():
    logits = torch.zeros(4, 3)
    labels = torch.tensor([3, 0, 3, 2])
    # every element: p = 0.5, focal weight (0.5)^2 * log(2), alpha 0.25 (pos) / 0.75 (neg)
    per_pos, per_neg = 0.25 * 0.25 * 0.6931472, 0.75 * 0.25 * 0.6931472
    expected = (2 * per_pos + 10 * per_neg) / 3.0
    got = category_focal_loss(logits, labels, 3, 0.25, 2.0, num_pos=2)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_point_nms_keeps_local_maxima():
    heat = torch.tensor([[[[0.1, 0.9, 0.2], [0.3, 0.4, 0.8], [0.7, 0.1, 0.05]]]])
    out = point_nms(heat)
    # A cell survives when it is the max of the 2x2 window reaching up and left of it:
    # 0.8 loses to 0.9 (up-left), 0.3 and 0.7 win their windows, 0.4 loses to 0.9.
    keep = (out > 0).squeeze()
    assert keep.tolist() == [[True, True, False], [True, False, False], [True, False, False]]
    assert out[0, 0, 0, 1] == 0.9


def test_dynamic_kernel_product_matches_einsum():
    torch.manual_seed(0)
    feats = torch.randn(3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    kernels = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    im = torch.tensor([2, 0, 2, 1, 0, 0, 2])
    out = dynamic_kernel_product_torch(kernels, feats, im)
    ref = torch.einsum("re,rehw->rhw", kernels, feats[im])
    assert torch.allclose(out, ref)
    assert torch.autograd.gradcheck(dynamic_kernel_product_torch, (kernels, feats, im))
    assert dynamic_kernel_product_torch(kernels[:0], feats, im[:0]).shape == (0, 4, 6)


def test_solov2_parameter_names_match_adelaidet():
    """Head parameter names and shapes of AdelaiDet's SOLOv2 (R-50, COCO defaults)."""
    import d2seg  # noqa: F401
    from d2seg.solo.heads import SOLOv2InsHead, SOLOv2MaskHead
    from d2seg.config import get_d2seg_cfg
    from detectron2.layers import ShapeSpec

    cfg = get_d2seg_cfg()
    cfg.merge_from_file("configs/SOLO/Base-SOLOv2.yaml")
    ins = SOLOv2InsHead(cfg, [ShapeSpec(channels=256)] * 5)
    mask = SOLOv2MaskHead(cfg, [ShapeSpec(channels=256)] * 4)
    sd = {"ins_head." + k: v.shape for k, v in ins.state_dict().items()}
    sd.update({"mask_head." + k: v.shape for k, v in mask.state_dict().items()})
    expected = {}
    for tower, cin in (("cate", 256), ("kernel", 258)):
        for i in range(4):
            expected[f"ins_head.{tower}_tower.{3 * i}.weight"] = (512, cin if i == 0 else 512, 3, 3)
            expected[f"ins_head.{tower}_tower.{3 * i + 1}.weight"] = (512,)
            expected[f"ins_head.{tower}_tower.{3 * i + 1}.bias"] = (512,)
    expected.update({
        "ins_head.cate_pred.weight": (80, 512, 3, 3), "ins_head.cate_pred.bias": (80,),
        "ins_head.kernel_pred.weight": (256, 512, 3, 3), "ins_head.kernel_pred.bias": (256,),
    })
    for lvl in range(4):
        for j in range(max(lvl, 1)):
            cin = 258 if (lvl == 3 and j == 0) else (256 if j == 0 else 128)
            p = f"mask_head.convs_all_levels.{lvl}.conv{j}"
            expected[f"{p}.0.weight"] = (128, cin, 3, 3)
            expected[f"{p}.1.weight"] = (128,)
            expected[f"{p}.1.bias"] = (128,)
    expected.update({"mask_head.conv_pred.0.weight": (256, 128, 1, 1),
                     "mask_head.conv_pred.1.weight": (256,),
                     "mask_head.conv_pred.1.bias": (256,)})
    assert {k: tuple(v) for k, v in sd.items()} == expected


def test_postprocess_maskness_area_filter_and_mask_nms():
    from d2seg.solo.inference import InferenceParams, postprocess_candidates

    probs = torch.full((4, 8, 8), 0.1)
    probs[0, 2:6, 2:6] = 0.9  # A: class 0, score 0.8 -> 0.8 * 0.9
    probs[1, 2:6, 2:6] = 0.6  # B: same mask, class 0, score 0.9 -> 0.54: removed by A
    probs[2, 0, 0] = 0.7  # C: 1 pixel, not larger than its min area 1: dropped
    probs[3, 2:6, 2:6] = 0.8  # D: same mask, other class: kept, 0.5 * 0.8
    scores = torch.tensor([0.8, 0.9, 0.95, 0.5])
    classes = torch.tensor([0, 0, 0, 1])
    min_areas = torch.tensor([1.0, 1.0, 1.0, 1.0])
    r = postprocess_candidates(probs, scores, classes, min_areas, InferenceParams(),
                               (8, 8), (8, 8), (16, 16))
    assert r.scores.tolist() == pytest.approx([0.72, 0.4])
    assert r.pred_classes.tolist() == [0, 1]
    # pasted x2 bilinearly: the 4x4 block becomes 8x8 (D, 0.8 vs 0.1, loses its corners)
    assert r.pred_masks.shape == (2, 16, 16) and r.pred_masks[:, 5:11, 4:12].all()
    assert r.pred_masks[0].sum().item() == 64 and r.pred_masks[1].sum().item() == 60
    assert r.pred_boxes.tensor.tolist() == [[4.0, 4.0, 12.0, 12.0]] * 2
    # Matrix NMS instead: B is decayed by exp(-2) (IoU 1 with A), then kept above 0.05
    r = postprocess_candidates(probs, scores, classes, min_areas,
                               InferenceParams(nms_type="matrix"), (8, 8), (8, 8), (8, 8))
    assert r.scores.tolist() == pytest.approx([0.72, 0.4, 0.54 * float(torch.exp(torch.tensor(-2.0)))])
    # nothing above the mask threshold -> empty result with all fields
    r = postprocess_candidates(probs * 0, scores, classes, min_areas, InferenceParams(),
                               (8, 8), (8, 8), (5, 7))
    assert len(r) == 0 and r.pred_masks.shape == (0, 5, 7) and r.pred_boxes.tensor.shape == (0, 4)
