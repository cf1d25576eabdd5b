"""dev/reference/reference_speed.py's parity check (also the AdelaiDet fixture tests' result check):
issue 17's tolerances per detection, with detections whose scores tie within 1e-4 accepted
in either order, and nothing else."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev", "reference"))
from reference_speed import compare, match_detections  # noqa: E402


def _detections(n=6, masks=True, boxes=True):
    g = torch.Generator().manual_seed(0)
    d = {"scores": torch.linspace(0.9, 0.4, n), "pred_classes": torch.arange(n) % 3}
    if boxes:
        d["pred_boxes"] = torch.rand(n, 4, generator=g) * 50
    if masks:
        m = torch.zeros(n, 12, 12, dtype=torch.bool)
        for i in range(n):  # disjoint-ish squares, one per detection
            m[i, i:i + 5, 2 * i % 7:2 * i % 7 + 5] = True
        d["pred_masks"] = m
    return d


def _take(d, order):
    return {k: v[order] for k, v in d.items()}


def _swap_23(d, score_gap):
    """(reference, ours): ``d`` with the scores of ranks 2 and 3 ``score_gap`` apart, and the
    same detections ranked the other way round: ours has detection 3 (its class, box and mask)
    at rank 2 and detection 2 at rank 3, each with the score of the rank (as when rounding
    moves two near-tied scores past each other)."""
    d = {k: v.clone() for k, v in d.items()}
    d["scores"][3] = d["scores"][2] - score_gap
    order = torch.tensor([0, 1, 3, 2, 4, 5])
    ours = _take(d, order)
    ours["scores"] = d["scores"].clone()
    return d, ours


def test_identical_and_rank_order():
    ref = _detections()
    check = compare(ref, _take(ref, torch.arange(6)), semantic=False)
    assert check["ok"] and "reordered_ties" not in check and check["min_mask_iou"] == 1.0
    assert match_detections(ref, ref).tolist() == list(range(6))


def test_tied_scores_in_another_order_are_accepted():
    ref, ours = _swap_23(_detections(), score_gap=2e-5)  # classes 2 and 0: rank by rank they differ
    assert not torch.equal(ref["pred_classes"], ours["pred_classes"])
    check = compare(ref, ours, semantic=False)
    assert check["ok"] and check["reordered_ties"] == 2
    assert check["classes_equal"] and check["max_score_diff"] <= 1e-4 and check["min_mask_iou"] == 1.0
    assert match_detections(ref, ours).tolist() == [0, 1, 3, 2, 4, 5]


def test_swaps_beyond_the_score_tolerance_fail():
    ref, ours = _swap_23(_detections(), score_gap=5e-4)
    assert not compare(ref, ours, semantic=False)["ok"]
    assert match_detections(ref, ours) is None


def test_same_class_tie_is_paired_by_mask_not_rank():
    ref = _detections()
    ref["pred_classes"][:] = 1
    ref, ours = _swap_23(ref, score_gap=1e-5)
    # rank by rank: same classes and scores, but the masks of ranks 2 and 3 are swapped
    check = compare(ref, ours, semantic=False, boxes=False)
    assert check["ok"] and check["reordered_ties"] == 2 and check["min_mask_iou"] == 1.0


def test_mask_or_box_beyond_tolerance_still_fails():
    ref = _detections()
    ours = {k: v.clone() for k, v in ref.items()}
    ours["pred_masks"][4] = False
    ours["pred_masks"][4, :2, :2] = True
    check = compare(ref, ours, semantic=False)
    assert not check["ok"] and check["min_mask_iou"] < 0.999
    ours = {k: v.clone() for k, v in ref.items()}
    ours["pred_boxes"][1, 2] += 0.05
    assert not compare(ref, ours, semantic=False)["ok"]
    assert compare(ref, ours, semantic=False, boxes=False)["ok"]


def test_boxes_only_ties():
    ref, ours = _swap_23(_detections(masks=False), score_gap=3e-5)
    check = compare(ref, ours, semantic=False)
    assert check["ok"] and check["reordered_ties"] == 2 and check["max_box_diff"] == 0.0


def test_counts_must_match():
    ref = _detections()
    assert not compare(ref, _take(ref, torch.arange(5)), semantic=False)["ok"]
