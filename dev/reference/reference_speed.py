#!/usr/bin/env python
"""Speed at parity: each reference model and d2seg's model with the same weights, timed alternately.

    python dev/reference/reference_speed.py --adelaidet /path/to/AdelaiDet --sparseinst /path/to/SparseInst \\
        --detectron2 /path/to/detectron2 --out output/reference_speed

For every pair (AdelaiDet FCOS, MEInst, CondInst, BlendMask, SOLOv2; hustvl/SparseInst;
Detectron2's PointRend instance and semantic) the reference model is built from its published
config at the published widths (R-50) by the fixture tools' family modules
(dev/reference/reference_*.py: random init from ``--seed``, biased so that it returns detections), its
state dict is converted by d2seg's converter and loaded strictly into d2seg's model built from
the matching shipped config (no option but the score threshold of the setting), and both run
on the same images at the config's test size (short side ``INPUT.MIN_SIZE_TEST`` unless
``--size``; textured synthetic photographs with a few objects, dev/reference/reference_fixtures.py's
``synthetic_images``), ``--threads`` threads (default 1) per side, CPU, eval mode,
``torch.no_grad()``.

Two settings: ``default`` (the configs' score thresholds) and ``all`` (every test-time score
threshold 0 on both sides: each model returns its maximum number of detections, 100 per
image; SOLOv2: only the threshold after Matrix NMS, see :data:`PAIRS`). The semantic model has
no threshold: only ``default``.

d2seg's side runs in up to three backends of the one model (``--backends``): ``d2seg``
(PyTorch float32, the parity reference of the other two), ``onnx`` (the model exported by
``d2seg.deploy.export_onnx`` at each image's size, a fixed-size graph, run by
``d2seg.deploy.ONNXModel`` on ONNX Runtime's CPU provider with ``--threads`` intra-op threads) and
``bf16`` (PyTorch under ``TEST.PRECISION bfloat16``, ``d2seg.engine.at_precision``). The ONNX
Runtime detections must equal d2seg float32's (the same tolerances as below); for bfloat16 the
difference in the number of detections (semantic: pixels whose argmax differs) is reported.

Per pair and setting: the first call on each image is untimed and checks parity (same number
of detections and classes, scores within 1e-4, boxes within 1e-2 px, mask IoU >= 0.999 per
detection, detections whose scores tie within 1e-4 matched in either order; semantic: argmax equal except where the reference's top-2 margin is within float
rounding); then ``--reps`` repetitions, each timing every image on the reference and on each d2seg
backend in turn (the order rotates from call to call). Reported: median time per repetition
(all images) of each, and per backend the ratio reference / backend as the median of the
per-repetition ratios (with its min-max). The two models live in two worker processes (AdelaiDet and d2seg both register
e.g. ``OneStageDetector`` and ``FCOS`` in Detectron2's registries), only one of which computes
at a time. ``--threads N`` sets ``torch.set_num_threads(N)`` in both workers (the reference,
d2seg float32 and bfloat16) and ``ONNXModel(..., num_threads=N)`` for ONNX Runtime, and
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` to N for the workers it starts.

The machine may be shared: absolute times move with its load (the 1-minute load average is
recorded), only the ratios of alternating runs mean something.

Writes ``<out>/reference_speed.json`` (every number) and ``<out>/reference_speed.md`` (the
table). Exit status 1 when a pair fails its parity check or errors.
"""
import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))  # dev/reference: the family modules
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# name -> what the pair is built from. ``thresholds``: (reference keys, d2seg keys) set to 0 in
# the "all" setting. ``boxes``: compare boxes (AdelaiDet's SOLOv2 returns zero boxes).
PAIRS = {
    "fcos": dict(checkout="adelaidet", reference="adelaidet-fcos", source="adelaidet",
                 d2seg_config="configs/FCOS/R_50_1x.yaml",
                 thresholds=(["MODEL.FCOS.INFERENCE_TH_TEST"], ["MODEL.FCOS.INFERENCE_TH_TEST"])),
    "meinst": dict(checkout="adelaidet", reference="adelaidet-meinst", source="adelaidet",
                   d2seg_config="configs/MEInst/MEInst_R_50_1x.yaml",
                   thresholds=(["MODEL.MEInst.INFERENCE_TH_TEST"], ["MODEL.FCOS.INFERENCE_TH_TEST"])),
    "condinst": dict(checkout="adelaidet", reference="condinst", source="adelaidet",
                     d2seg_config="configs/CondInst/R_50_1x.yaml",
                     thresholds=(["MODEL.FCOS.INFERENCE_TH_TEST"], ["MODEL.FCOS.INFERENCE_TH_TEST"])),
    "blendmask": dict(checkout="adelaidet", reference="blendmask", source="adelaidet",
                      d2seg_config="configs/BlendMask/R_50_1x.yaml",
                      thresholds=(["MODEL.FCOS.INFERENCE_TH_TEST"], ["MODEL.FCOS.INFERENCE_TH_TEST"])),
    # SOLOv2: both implementations compute the mask of every (cell, class) pair above
    # SCORE_THR before their pre-NMS cap, so SCORE_THR 0 would make 309,760 masks at 800 px;
    # "all" lowers UPDATE_THR (after Matrix NMS) only, and the category bias is set so that a
    # few hundred pairs pass 0.1 (CATE_BIAS below)
    "solov2": dict(checkout="adelaidet", reference="adelaidet-solov2", source="adelaidet",
                   d2seg_config="configs/SOLO/SOLOv2_R_50_3x.yaml", boxes=False,
                   thresholds=(["MODEL.SOLOV2.UPDATE_THR"], ["MODEL.SOLO.UPDATE_THR"])),
    "sparseinst": dict(checkout="sparseinst", reference="sparseinst", source="sparseinst",
                       d2seg_config="configs/SparseInst/sparse_inst_r50_giam.yaml",
                       thresholds=(["MODEL.SPARSE_INST.CLS_THRESHOLD"], ["MODEL.SPARSE_INST.CLS_THRESHOLD"])),
    "pointrend-instance": dict(checkout="detectron2", reference="pointrend-instance",
                               source="pointrend-upstream",
                               d2seg_config="configs/PointRend/pointrend_rcnn_R_50_FPN_1x_coco.yaml",
                               thresholds=(["MODEL.ROI_HEADS.SCORE_THRESH_TEST"],
                                           ["MODEL.ROI_HEADS.SCORE_THRESH_TEST"])),
    "pointrend-semantic": dict(checkout="detectron2", reference="pointrend-semantic",
                               source="pointrend-upstream", semantic=True,
                               d2seg_config="configs/PointRend/pointrend_semantic_R_50_FPN_1x_cityscapes.yaml",
                               thresholds=None),
}
SETTINGS = ("default", "all")
# d2seg's backends of one model: PyTorch float32 (always timed: the other two's parity reference),
# ONNX Runtime (fixed-size export, --threads intra-op threads), PyTorch at TEST.PRECISION bfloat16
BACKENDS = ("d2seg", "onnx", "bf16")
BACKEND_TITLES = {"d2seg": "d2seg", "onnx": "ONNX Runtime", "bf16": "bfloat16"}
# SOLOv2's category bias at the published widths (the fixture's -2.8 is for its narrow model:
# here tens of thousands of candidate masks would pass 0.1): ~0.3 % of the pairs pass
CATE_BIAS = -3.6
SCORE_TOL, BOX_TOL, MIN_IOU = 1e-4, 1e-2, 0.999
# semantic: a differing argmax pixel is a tie when the reference's top-2 margin is below this
TIE_MARGIN = 1e-4
# semantic, ONNX Runtime against d2seg float32: issue 30's export parity bar (argmax equal on
# >= 99.9 % of the pixels, as tests/test_deploy_parity.py), for which the ties' margin is too tight
# (another convolution library sums in another order)
MIN_ARGMAX_AGREEMENT = 0.999


# ----------------------------------------------------------------------------- both sides


def test_size(config: str, size=None):
    """(short side, long-side cap) of a d2seg config's test input (``size`` overrides the
    short side and scales the cap with it)."""
    from d2seg.config import get_d2seg_cfg

    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, config))
    short, cap = int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST)
    if size:
        cap, short = round(cap * size / short), int(size)
    return short, cap


def image_sizes(short: int, cap: int, semantic: bool):
    """Two test-size images: landscape 4:3 and 3:2 (capped) for COCO models; Cityscapes'
    1:2 twice for the semantic model."""
    if semantic:
        return ((short, min(cap, 2 * short)),) * 2
    return ((short, min(cap, round(short * 4 / 3))), (short, min(cap, round(short * 3 / 2))))


def make_images(seed: int, sizes, semantic: bool) -> List[Dict]:
    from reference_fixtures import synthetic_images

    imgs = synthetic_images(seed, sizes=sizes, max_objects=8)
    return [{"image": d["image"], "height": d["height"], "width": d["width"]} for d in imgs]


def result_summary(out: Dict, semantic: bool) -> Dict:
    if semantic:
        logits = out["sem_seg"].float()
        top2 = logits.topk(2, dim=0).values
        return {"argmax": logits.argmax(0).to(torch.uint8), "margin": top2[0] - top2[1]}
    from reference_fixtures import instances_to_dict

    return instances_to_dict(out["instances"])


def count(out: Dict, semantic: bool) -> int:
    return -1 if semantic else len(out["instances"])


# ----------------------------------------------------------------------------- reference side


def build_reference(pair: Dict, checkout: str, seed: int, opts: List, workdir: str):
    """The reference model at the published widths with ``opts`` ([KEY, VALUE, ...]), from the
    fixture tools' family modules with their narrowing switched off."""
    ref = pair["reference"]
    if pair["checkout"] == "adelaidet":
        import reference_adelaidet as ra

        ra.install_stubs(checkout)
        sys.path.insert(0, checkout)
        ra.NARROW, ra.NARROW_FOR = [], {}  # the published widths
        if ref in ("condinst", "blendmask"):
            import reference_condinst_blendmask as rcb

            rcb.NARROW, rcb.NARROW_MASK = [], {"condinst": [], "blendmask": []}
            cfg, model = rcb._build(ref, checkout, seed, opts)
            rcb._randomise(model, ref, seed)
            return model
        if ref == "adelaidet-meinst":
            import numpy as np

            comps, var, mean = ra._random_meinst_encoding(seed, 60, 28)
            path = os.path.join(workdir, "encoding_reference.npz")
            np.savez(path, components_c=comps[None].numpy(), explained_variance_c=var[None].numpy(),
                     mean_c=mean[None].numpy())
            cfg, model = ra._build(ref, checkout, seed, list(opts) + ["MODEL.MEInst.PATH_COMPONENTS", path])
            enc = model.proposal_generator.mask_encoding
            with torch.no_grad():
                enc.components.copy_(comps.float())
                enc.explained_variances.copy_(var.float())
                enc.means.copy_(mean.float())
            ra.patch_meinst_layout()
            return model
        cfg, model = ra._build(ref, checkout, seed, opts)
        if ref == "adelaidet-solov2":
            with torch.no_grad():
                for k, p in model.named_parameters():
                    if k.endswith("cate_pred.bias"):
                        p.fill_(CATE_BIAS)
        return model
    if pair["checkout"] == "sparseinst":
        import reference_sparseinst as rs

        if "timm" not in sys.modules:  # (stubbed once per process)
            rs._stub_timm()
        sys.path.insert(0, checkout)
        cfg, model = rs.build_reference_model(checkout, seed, opts)
        return model
    import reference_pointrend as rp

    sys.path.insert(0, f"{checkout}/projects/PointRend")
    if ref == "pointrend-semantic":  # Detectron2's config is R-101; the published R-50 model
        opts = ["MODEL.RESNETS.DEPTH", 50] + list(opts)
    cfg, model = rp.build_reference_model(ref, checkout, seed, opts)
    return model


# ----------------------------------------------------------------------------- d2seg side


def build_d2seg(pair: Dict, weights: Dict, opts: List, workdir: str):
    """d2seg's model from the shipped config plus ``opts`` (the setting's thresholds), the
    reference's weights converted and loaded strictly (``pair["source"]`` None: d2seg's own
    state dict, loaded as it is). -> (model, cfg)."""
    import d2seg  # noqa: F401
    from d2seg.config import get_d2seg_cfg
    from d2seg.model_zoo import convert_state_dict
    from detectron2.modeling import build_model

    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(ROOT, pair["d2seg_config"]))
    cfg.merge_from_list(list(opts))
    if pair["reference"] == "adelaidet-meinst":
        from d2seg.meinst import save_encoding
        from d2seg.meinst.convert import convert_adelaidet_meinst

        _, params = convert_adelaidet_meinst(weights)
        path = os.path.join(workdir, "encoding_d2seg.npz")
        save_encoding(path, params)
        cfg.MODEL.MEINST.PATH_COMPONENTS = path
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    model = build_model(cfg)
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}
    if pair["source"] is None:
        model.load_state_dict(weights, strict=True)
        return model, cfg
    if pair["source"] != "adelaidet":
        weights = {"model": weights}
    result = convert_state_dict(weights, source=pair["source"], target_keys=model.state_dict().keys())
    model.load_state_dict(result.state_dict, strict=True)
    return model, cfg


def d2seg_backends(model, cfg, images: List[Dict], backends, workdir: str, unavailable: Optional[Dict] = None,
                   threads: int = 1) -> Dict:
    """name -> callable(batched_inputs) for each of ``backends`` (:data:`BACKENDS`) of one
    d2seg model in eval mode: "d2seg" the model itself (float32); "bf16" the model under
    ``TEST.PRECISION bfloat16`` (:func:`d2seg.engine.at_precision`: raises where the CPU lacks
    bfloat16); "onnx" the model exported with :func:`d2seg.deploy.export_onnx` at the size of
    each of ``images`` (fixed-size graphs, files in ``workdir``), each run by
    :class:`d2seg.deploy.ONNXModel` with ``threads`` intra-op threads on the images of its size
    (the PyTorch backends use the process's ``torch.get_num_threads()``).
    A model that d2seg.deploy cannot export (ValueError / ExportError naming the option) gets
    no "onnx" runner: the reason goes in ``unavailable["onnx"]`` when a dict is given, else
    the error is raised."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backend(s) {sorted(unknown)}; expected some of {BACKENDS}")
    runners = {"d2seg": model}
    if "bf16" in backends:
        from d2seg.engine import at_precision

        bf16_cfg = cfg.clone()
        bf16_cfg.defrost()
        bf16_cfg.TEST.PRECISION = "bfloat16"
        runners["bf16"] = at_precision(bf16_cfg, model)
    if "onnx" in backends:
        from d2seg.deploy import ExportError, ONNXModel, export_onnx

        sessions = {}
        try:
            for d in images:
                h, w = d["image"].shape[-2:]
                if (h, w) not in sessions:
                    path = os.path.join(workdir, f"model_{h}x{w}.onnx")
                    export_onnx(model, path, cfg, height=h, width=w, dynamic=False)
                    sessions[(h, w)] = ONNXModel(path, cfg, num_threads=threads)
        except (ValueError, ExportError) as e:
            if unavailable is None:
                raise
            unavailable["onnx"] = str(e)
            return runners

        def run_onnx(batched_inputs):
            return [r for x in batched_inputs for r in sessions[tuple(x["image"].shape[-2:])]([x])]

        runners["onnx"] = run_onnx
    return runners


# ----------------------------------------------------------------------------- worker


def worker(side: str, pair_name: str, args: Dict, conn):
    """One side of a pair in its own process (``args["pair"]``, else ``PAIRS[pair_name]``).
    Commands on ``conn``: ("build", setting) -> ("built", info); ("check", i, backend) ->
    ("result", count, summary, seconds); ("time", i, backend) -> ("time", seconds, count);
    ("quit",). ``backend``: one of ``args["backends"]`` on d2seg's side (see
    :func:`d2seg_backends`; None: float32), ignored on the reference's. ``args["threads"]``
    (default 1): torch's threads in this worker and ONNX Runtime's intra-op threads."""
    threads = int(args.get("threads", 1))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    pair = args.get("pair") or PAIRS[pair_name]
    semantic = pair.get("semantic", False)
    model = None
    runners = {}
    try:
        images = make_images(args["seed"], args["sizes"], semantic)
        while True:
            cmd = conn.recv()
            if cmd[0] == "quit":
                break
            if cmd[0] == "build":
                setting = cmd[1]
                keys = pair["thresholds"][0 if side == "reference" else 1] if pair["thresholds"] else []
                opts = [x for k in keys for x in (k, 0.0)] if setting == "all" else []
                model, runners, unavailable = None, {}, {}
                if side == "reference":
                    model = build_reference(pair, args["checkout"], args["seed"], opts, args["workdir"])
                    path = os.path.join(args["workdir"], "weights.pt")
                    if not os.path.isfile(path):
                        torch.save(model.state_dict(), path)
                else:
                    weights = torch.load(os.path.join(args["workdir"], "weights.pt"), weights_only=False)
                    model, cfg = build_d2seg(pair, weights, opts, args["workdir"])
                model.eval()
                if side != "reference":
                    runners = d2seg_backends(model, cfg, images, args.get("backends", BACKENDS[:1]),
                                             args["workdir"], unavailable, threads=threads)
                conn.send(("built", {"sizes": [(d["height"], d["width"]) for d in images], "opts": opts,
                                     "unavailable": unavailable}))
                continue
            i = cmd[1]
            run = runners[cmd[2] or "d2seg"] if runners else model
            x = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in images[i].items()}]
            with torch.no_grad():
                t0 = time.perf_counter()
                out = run(x)[0]
                dt = time.perf_counter() - t0
            if cmd[0] == "check":
                conn.send(("result", count(out, semantic), result_summary(out, semantic), dt))
            else:
                conn.send(("time", dt, count(out, semantic)))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Side:
    def __init__(self, side: str, pair_name: str, args: Dict):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(side, pair_name, args, child), daemon=True)
        self.proc.start()
        self.side = side

    def ask(self, *cmd):
        self.conn.send(cmd)
        reply = self.conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"{self.side} worker:\n{reply[1]}")
        return reply

    def close(self):
        try:
            self.conn.send(("quit",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


# ----------------------------------------------------------------------------- parity check


def compare(ref: Dict, ours: Dict, semantic: bool, boxes: bool = True) -> Dict:
    """Issue 17's tolerances on one image: -> {"ok": bool, and the largest differences}.

    Detections are compared rank by rank; when that fails, each reference detection is paired
    instead with a detection of ``ours`` of the same class whose score is within SCORE_TOL
    (:func:`match_detections`): two detections whose scores tie within the tolerance may come
    in either order. The tolerances then apply to the pairs."""
    if semantic:
        differ = ref["argmax"] != ours["argmax"]
        n = int(differ.sum())
        worst = float(ref["margin"][differ].max()) if n else 0.0
        return {"ok": n == 0 or worst <= TIE_MARGIN, "argmax_differ": n, "max_margin_where_differ": worst}
    n_ref, n_ours = len(ref["scores"]), len(ours["scores"])
    out = {"detections": [n_ref, n_ours]}
    if n_ref != n_ours:
        return dict(out, ok=False)
    if n_ref == 0:
        return dict(out, ok=True)
    boxes = boxes and "pred_boxes" in ref
    checked = _compare_pairs(ref, ours, torch.arange(n_ref), boxes)
    if not checked["ok"]:
        perm = match_detections(ref, ours, boxes)
        if perm is not None:
            reordered = _compare_pairs(ref, ours, perm, boxes)
            if reordered["ok"]:
                checked = dict(reordered, reordered_ties=int((perm != torch.arange(n_ref)).sum()))
    return dict(out, **checked)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of flattened bool masks, row by row (1 where both are empty)."""
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _compare_pairs(ref: Dict, ours: Dict, perm: torch.Tensor, boxes: bool) -> Dict:
    """The tolerances on the pairs (reference i, ours perm[i])."""
    out = {"classes_equal": bool(torch.equal(ref["pred_classes"], ours["pred_classes"][perm])),
           "max_score_diff": float((ref["scores"] - ours["scores"][perm]).abs().max())}
    ok = out["classes_equal"] and out["max_score_diff"] <= SCORE_TOL
    if boxes:
        out["max_box_diff"] = float((ref["pred_boxes"] - ours["pred_boxes"][perm]).abs().max())
        ok = ok and out["max_box_diff"] <= BOX_TOL
    if "pred_masks" in ref:
        a, b = ref["pred_masks"].flatten(1), ours["pred_masks"][perm].bool().flatten(1)
        out["min_mask_iou"] = float(_mask_iou(a, b).min())
        ok = ok and out["min_mask_iou"] >= MIN_IOU
    return dict(out, ok=bool(ok))


def match_detections(ref: Dict, ours: Dict, boxes: bool = True):
    """Pairs each reference detection, in the reference's order, with a detection of ``ours``
    not paired yet, of the same class and with a score within SCORE_TOL: the one at the same
    rank when it qualifies, else the one whose mask overlaps most (whose box is closest when
    there are no masks). -> (R,) long indices into ``ours``, or None when some reference
    detection has no such partner."""
    n = len(ref["scores"])
    masks = "pred_masks" in ref
    if masks:
        a, b = ref["pred_masks"].flatten(1), ours["pred_masks"].bool().flatten(1)
    used = torch.zeros(n, dtype=torch.bool)
    perm = torch.empty(n, dtype=torch.long)
    for i in range(n):
        cand = ((ours["pred_classes"] == ref["pred_classes"][i])
                & ((ours["scores"] - ref["scores"][i]).abs() <= SCORE_TOL) & ~used).nonzero()[:, 0]
        if cand.numel() == 0:
            return None
        if masks:
            closeness = _mask_iou(a[i:i + 1].expand(len(cand), -1), b[cand])
        elif boxes:
            closeness = -(ours["pred_boxes"][cand] - ref["pred_boxes"][i]).abs().amax(dim=1)
        else:
            closeness = -(ours["scores"][cand] - ref["scores"][i]).abs()
        same = (cand == i).nonzero()[:, 0]
        qualifies = MIN_IOU if masks else (-BOX_TOL if boxes else -SCORE_TOL)
        if same.numel() and closeness[same[0]] >= qualifies:
            j = cand[same[0]]
        else:
            j = cand[closeness.argmax()]
        perm[i] = j
        used[j] = True
    return perm


# ----------------------------------------------------------------------------- one pair


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_pair(name: str, checkout: str, args) -> Dict:
    pair = PAIRS[name]
    semantic = pair.get("semantic", False)
    workdir = tempfile.mkdtemp(prefix=f"reference_speed_{name}_")
    # d2seg is imported here, never in the reference's worker (Detectron2's registries would
    # hold both sides' "FCOS", "SparseInst", ...)
    short, cap = test_size(pair["d2seg_config"], args.size)
    backends = ["d2seg"] + [b for b in getattr(args, "backends", ()) if b != "d2seg"]
    wargs = {"sizes": image_sizes(short, cap, semantic)[:args.images], "seed": args.seed, "checkout": checkout,
             "workdir": workdir, "pair": pair, "backends": backends, "threads": getattr(args, "threads", 1)}
    sides = {}
    rows = []
    try:
        sides["reference"] = Side("reference", name, wargs)
        sides["d2seg"] = Side("d2seg", name, wargs)
        for setting in SETTINGS if pair["thresholds"] else SETTINGS[:1]:
            if setting not in args.settings:
                continue
            t_build = time.time()
            info = sides["reference"].ask("build", setting)[1]  # writes the weights first
            unavailable = sides["d2seg"].ask("build", setting)[1]["unavailable"]
            row = {"model": name, "setting": setting, "sizes": info["sizes"],
                   "reference_opts": info["opts"], "load": [load_average()], "unavailable": unavailable}
            row.update(measure({"reference": sides["reference"], "d2seg": sides["d2seg"]},
                               [b for b in backends if b not in unavailable],
                               len(info["sizes"]), args.reps, semantic, pair.get("boxes", True),
                               on_rep=lambda: row["load"].append(load_average())))
            row["wall_s"] = time.time() - t_build
            print(format_row(row), flush=True)
            rows.append(row)
    except Exception as e:
        traceback.print_exc()
        rows.append({"model": name, "setting": "-", "error": str(e).splitlines()[-1] if str(e) else repr(e)})
    finally:
        for s in sides.values():
            s.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def measure(sides: Dict, backends: List[str], n_img: int, reps: int, semantic: bool, boxes: bool = True,
            on_rep=None) -> Dict:
    """Parity, then alternating timing, of the built ``sides["reference"]`` and each of d2seg's
    ``backends`` on ``sides["d2seg"]`` (:class:`Side` or anything with its ``ask``).

    The first call on each image is untimed: the reference against d2seg float32 gives
    ``checks`` / ``parity``; each other backend against d2seg float32 gives
    ``backend_checks[b]`` / ``backend_parity[b]`` (semantic: or argmax equal on
    :data:`MIN_ARGMAX_AGREEMENT` of the pixels). Then ``reps`` repetitions, each calling every
    image on the reference and on every backend in turn, the order rotated by one from image to
    image and repetition to repetition. -> the row's numbers: per runner the times (s, all
    images per repetition), the detections per image of the first repetition and the median;
    per backend the ratio reference / backend (median and min–max over the repetitions)."""
    runners = [("reference", "reference", None)] + [(b, "d2seg", b) for b in backends]
    checks, backend_checks = [], {b: [] for b in backends if b != "d2seg"}
    for i in range(n_img):
        summaries = {label: sides[side].ask("check", i, b)[2] for label, side, b in runners}
        checks.append(compare(summaries["reference"], summaries["d2seg"], semantic, boxes))
        for b in backend_checks:
            c = compare(summaries["d2seg"], summaries[b], semantic, boxes)
            if semantic:
                c["argmax_agreement"] = 1 - c["argmax_differ"] / summaries[b]["argmax"].numel()
                c["ok"] = c["ok"] or c["argmax_agreement"] >= MIN_ARGMAX_AGREEMENT
            backend_checks[b].append(c)
    times = {label: [] for label, _, _ in runners}
    counts = {label: [] for label, _, _ in runners}
    for rep in range(reps):
        total = dict.fromkeys(times, 0.0)
        for i in range(n_img):
            k = (rep + i) % len(runners)
            for label, side, b in runners[k:] + runners[:k]:
                _, dt, n = sides[side].ask("time", i, b)
                total[label] += dt
                if rep == 0:
                    counts[label].append(n)
        for label in total:
            times[label].append(total[label])
        if on_rep:
            on_rep()
    out = {"checks": checks, "parity": all(c["ok"] for c in checks),
           "backend_checks": backend_checks,
           "backend_parity": {b: all(c["ok"] for c in cs) for b, cs in backend_checks.items()},
           "times_s": times, "detections": counts, "reference_median_s": statistics.median(times["reference"]),
           "backends": {}}
    for b in backends:
        ratios = [r / o for r, o in zip(times["reference"], times[b])]
        out["backends"][b] = {"median_s": statistics.median(times[b]), "ratio": statistics.median(ratios),
                              "ratio_min": min(ratios), "ratio_max": max(ratios)}
    d = out["backends"]["d2seg"]  # the keys of the float32-only table
    out.update({"d2seg_median_s": d["median_s"], "ratio": d["ratio"], "ratio_min": d["ratio_min"],
                "ratio_max": d["ratio_max"]})
    return out


def _differences(c: Dict) -> str:
    """One compare() result in words: the largest differences."""
    if "argmax_differ" in c:
        agree = f" ({100 * (1 - c['argmax_agreement']):.4f} %)" if "argmax_agreement" in c else ""
        return f"{c['argmax_differ']} px differ{agree}"
    parts = []
    if "max_score_diff" in c:
        parts.append(f"score {c['max_score_diff']:.1e}")
    if "max_box_diff" in c:
        parts.append(f"box {c['max_box_diff']:.1e}")
    if "min_mask_iou" in c:
        parts.append(f"IoU {c['min_mask_iou']:.4f}")
    if c.get("reordered_ties"):
        parts.append(f"{c['reordered_ties']} tied scores in another order")
    if not parts and c["detections"][0] != c["detections"][1]:
        parts.append("{} vs {} detections".format(*c["detections"]))
    return ", ".join(parts) or "0 detections"


def _ratio(b: Dict) -> str:
    return f"**{b['ratio']:.2f}** ({b['ratio_min']:.2f}–{b['ratio_max']:.2f})"


def format_row(row: Dict) -> str:
    if "error" in row:
        return f"| {row['model']} | – | error: {row['error']} |"
    sizes = ", ".join(f"{h}×{w}" for h, w in row["sizes"])
    det = row["detections"]
    det_s = "–" if det["reference"][0] < 0 else \
        f"{'/'.join(map(str, det['reference']))} / {'/'.join(map(str, det['d2seg']))}"
    parity = (("same" if row["parity"] else "**DIFFERENT**") + " ("
              + "; ".join(_differences(c) for c in row["checks"]) + ")")
    cells = [row["model"], row["setting"], sizes, det_s, parity,
             f"{row['reference_median_s'] * 1000:.0f}", f"{row['d2seg_median_s'] * 1000:.0f}", _ratio(row)]
    backends = row.get("backends", {})
    if "onnx" in row.get("unavailable", {}):
        cells += ["–", "–", "not exported: " + row["unavailable"]["onnx"].replace("|", "/")]
    elif "onnx" in backends:
        onnx = backends["onnx"]
        cells += [f"{onnx['median_s'] * 1000:.0f}", _ratio(onnx),
                  ("same" if row["backend_parity"]["onnx"] else "**DIFFERENT**") + " ("
                  + "; ".join(_differences(c) for c in row["backend_checks"]["onnx"]) + ")"]
    elif "bf16" in backends:
        cells += ["–"] * 3  # not asked for
    if "bf16" in backends:
        bf16 = backends["bf16"]
        if semantic_row(row):
            delta = "; ".join(_differences(c) for c in row["backend_checks"]["bf16"])
        else:
            delta = "/".join(f"{b - f:+d}" for f, b in zip(det["d2seg"], det["bf16"]))
        cells += [f"{bf16['median_s'] * 1000:.0f}", _ratio(bf16), delta]
    return "| " + " | ".join(cells) + " |"


def semantic_row(row: Dict) -> bool:
    return row["detections"]["reference"][0] < 0


def header(backends=BACKENDS) -> str:
    """The table's header, with the ONNX Runtime and bfloat16 columns when either is measured."""
    cols = HEADER_COLUMNS + (EXTRA_COLUMNS if set(backends) - {"d2seg"} else [])
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


HEADER_COLUMNS = ["model", "setting", "images (H×W)", "detections per image: reference / d2seg",
                  "parity (largest differences per image)", "reference ms (median)", "d2seg ms (median)",
                  "ratio reference / d2seg (min–max over reps)"]
EXTRA_COLUMNS = ["ONNX Runtime ms (median)", "ratio reference / ONNX Runtime",
                 "ONNX Runtime = d2seg float32 (largest differences per image)", "bfloat16 ms (median)",
                 "ratio reference / bfloat16", "bfloat16 − float32 detections per image (semantic: px differ)"]
HEADER = header(BACKENDS[:1])


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "(not installed)"


def _git(args) -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", ROOT] + args, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def write_report(rows: List[Dict], args, started: float, out: str, quiet: bool = False):
    os.makedirs(out, exist_ok=True)
    threads = getattr(args, "threads", 1)
    meta = {"command": "python dev/reference/reference_speed.py " + " ".join(sys.argv[1:]),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
            "wall_min": (time.time() - started) / 60, "torch": torch.__version__,
            "threads": threads, "reps": args.reps, "backends": ["d2seg"] + [b for b in args.backends if b != "d2seg"], "seed": args.seed, "size": args.size,
            "d2seg_commit": _git(["rev-parse", "HEAD"]),
            "d2seg_uncommitted": _git(["status", "--short", "--untracked-files=no"]).splitlines()}
    with open(os.path.join(out, "reference_speed.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    loads = [x for r in rows for x in r.get("load", [])]
    lines = [f"- Command: `{meta['command']}`",
             f"- d2seg at {meta['d2seg_commit'][:12]}"
             + (f" with uncommitted changes in {len(meta['d2seg_uncommitted'])} files"
                if meta["d2seg_uncommitted"] else ""),
             f"- Date: {meta['date_utc']} UTC, {meta['wall_min']:.1f} min; torch {meta['torch']}, CPU, "
             f"{threads} thread{'s' if threads > 1 else ''} per side (torch.set_num_threads; ONNX Runtime "
             f"intra-op threads), eval mode, torch.no_grad(), batch 1",
             f"- {args.reps} repetitions per pair and setting; a repetition times every image on "
             "both sides in turn (which side goes first alternates); the first call per image is "
             "untimed and checks parity",
             f"- 1-minute load average during the run: {min(loads):.1f}–{max(loads):.1f}" if loads else "",
             "- Settings: default = the configs' score thresholds; all = every test-time score "
             "threshold 0 on both sides (maximum detections)",
             f"- d2seg backends: {', '.join(BACKEND_TITLES[b] for b in meta['backends'])} (ONNX Runtime "
             "{}: fixed-size export per image size, {} intra-op thread(s); bfloat16: TEST.PRECISION "
             "bfloat16)".format(_ort_version(), threads) if len(meta["backends"]) > 1 else "",
             "", header(meta["backends"])] + [format_row(r) for r in rows]
    with open(os.path.join(out, "reference_speed.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side (default 5)")
    p.add_argument("--size", type=int, default=None,
                   help="short side of the images (default: each config's INPUT.MIN_SIZE_TEST)")
    p.add_argument("--images", type=int, default=2, choices=(1, 2), help="images per repetition (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="threads per side: torch.set_num_threads in both workers, ONNX Runtime's intra-op "
                        "threads (default 1)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS),
                   help="d2seg's backends timed with the reference (default all; d2seg float32 always)")
    p.add_argument("--adelaidet", help="checkout of aim-uofa/AdelaiDet")
    p.add_argument("--sparseinst", help="checkout of hustvl/SparseInst")
    p.add_argument("--detectron2", help="Detectron2 source tree (projects/PointRend)")
    p.add_argument("--out", default="output/reference_speed")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1 (got {args.threads})")
    checkouts = {"adelaidet": args.adelaidet, "sparseinst": args.sparseinst, "detectron2": args.detectron2}
    for name in args.models:
        c = PAIRS[name]["checkout"]
        if not checkouts[c] or not os.path.isdir(checkouts[c]):
            p.error(f"{name} needs --{c} <checkout> (got {checkouts[c]!r})")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = []
    print(header(args.backends), flush=True)
    for name in args.models:
        rows += run_pair(name, os.path.abspath(checkouts[PAIRS[name]["checkout"]]), args)
        write_report(rows, args, started, args.out, quiet=True)  # partial results on disk
    write_report(rows, args, started, args.out)
    bad = [r for r in rows if "error" in r or not r.get("parity", False)
           or not r.get("backend_parity", {}).get("onnx", True)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
