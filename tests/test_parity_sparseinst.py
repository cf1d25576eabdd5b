"""Parity with hustvl/SparseInst (fixture tests/data/reference/sparseinst.pt, written by
``dev/reference/reference_fixtures.py --reference sparseinst``: hustvl's R-50 G-IAM model narrowed,
random weights, two small images with ground truth).

hustvl's state dict, converted by d2seg's own converter, is loaded into d2seg's model built
from the shipped ``configs/SparseInst/sparse_inst_r50_giam.yaml`` (with only the fixture's
width overrides) and must reproduce the decoder's outputs (``pred_logits``, ``pred_masks``,
``pred_scores``), the final instances and every training loss. The fixture's weights put the
0.005 score threshold among the queries (``fx["threshold"]``: how many of each image's queries
the reference cut), so the threshold path is compared as well. The reference is not needed.
"""
import pytest
import torch
from parity_common import batch, converted_model, load_fixture

# the fixtures were computed with one thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_NAMES = {"loss_ce": "loss_cls", "loss_dice": "loss_dice", "loss_mask": "loss_mask",
              "loss_objectness": "loss_objectness"}


def _tol(ref):
    return max(1e-4, 1e-5 * float(ref.abs().max()))


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    fx = load_fixture("sparseinst.pt")
    cfg, model = converted_model(fx, "sparseinst")
    return fx, cfg, model


def test_fixture_records_reference(setup):
    fx, cfg, _ = setup
    assert fx["repo"] == "hustvl/SparseInst" and len(fx["commit"]) == 40
    # the shipped config carries hustvl's training conventions without extra options
    assert cfg.MODEL.SPARSE_INST.LOSS.MASK_PIXEL_WEIGHT == 5.0
    assert cfg.MODEL.SPARSE_INST.LOSS.TARGET_DOWNSAMPLE == "bilinear"


def test_head_outputs_and_results(setup):
    fx, _, model = setup
    head = {}

    def hook(_m, _i, out):
        head.update({k: v.detach() for k, v in out.items() if torch.is_tensor(v)})

    h = model.decoder.register_forward_hook(hook)
    model.eval()
    with torch.no_grad():
        results = model(batch(fx))
    h.remove()
    for k, ref in fx["outputs"]["head"].items():
        diff = float((head[k] - ref).abs().max())
        assert diff <= _tol(ref), f"{k}: max abs diff {diff}"
    for r, ref in zip(results, fx["outputs"]["results"]):
        inst = r["instances"]
        assert len(inst) == len(ref["scores"]) > 0
        assert torch.equal(inst.pred_classes, ref["pred_classes"])
        assert float((inst.scores - ref["scores"]).abs().max()) <= 1e-4
        pm, rm = inst.pred_masks, ref["pred_masks"]
        inter = (pm & rm).flatten(1).sum(1).float()
        union = (pm | rm).flatten(1).sum(1).float().clamp(min=1)
        assert float((inter / union).min()) >= 0.999


def test_score_threshold_cuts_the_same_queries(setup):
    """Some, not all, queries of each image fall below the score threshold, in the reference
    and in d2seg alike: the threshold path is part of the comparison."""
    fx, cfg, model = setup
    thr, cut = fx["threshold"]["score"], fx["threshold"]["cut"]
    assert cfg.MODEL.SPARSE_INST.CLS_THRESHOLD == thr
    head = fx["outputs"]["head"]
    n = head["pred_logits"].shape[1]
    assert all(0 < c < n for c in cut), cut
    # the reference's cut, recomputed from its recorded outputs: sqrt(p_class * p_objectness)
    ref_scores = torch.sqrt(head["pred_logits"].sigmoid() * head["pred_scores"].sigmoid()).max(-1).values
    assert (ref_scores <= thr).sum(-1).tolist() == cut
    assert [len(r["scores"]) for r in fx["outputs"]["results"]] == [n - c for c in cut]
    # d2seg's scores fall on the same side of the threshold, query by query, far from it
    model.eval()
    with torch.no_grad():
        out = model.predict(model.preprocess_image(batch(fx)).tensor)
    ours = torch.sqrt(out["pred_logits"].sigmoid() * out["pred_scores"].sigmoid()).max(-1).values
    assert torch.equal(ours > thr, ref_scores > thr)
    assert float((ours / thr).log().abs().min()) > 0.05  # no query within 5 % of the threshold
    with torch.no_grad():
        results = model(batch(fx))
    assert [len(r["instances"]) for r in results] == [n - c for c in cut]


def test_training_losses(setup):
    fx, _, model = setup
    model.train()
    losses = model(batch(fx))
    assert set(losses) == {LOSS_NAMES[k] for k in fx["losses"]}
    for k, ref in fx["losses"].items():
        got = float(losses[LOSS_NAMES[k]].detach())
        assert abs(got - float(ref)) <= 1e-4 * abs(float(ref)), f"{k}: {got} vs {float(ref)}"
