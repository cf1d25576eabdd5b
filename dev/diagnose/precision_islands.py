#!/usr/bin/env python
"""Where does bfloat16 cost a trained model its AP? The model evaluated on its DATASETS.TEST
at float32, at TEST.PRECISION bfloat16, and at bfloat16 with named submodules kept in
float32 ("islands": the module runs with autocast off, its floating inputs cast to float32).
A module whose island brings the AP back to float32's is where the loss happens.

    OMP_NUM_THREADS=1 DETECTRON2_DATASETS=datasets python dev/diagnose/precision_islands.py \\
        --config-file configs/SparseInst/sparse_inst_r18_giam_loc_shapes.yaml \\
        --weights output/.../model_final.pth --output /tmp/islands \\
        --islands "decoder.inst_branch.cls_score,decoder.inst_branch.objectness" --islands backbone \
        TEST.FLOAT32_SCORES False

Each ``--islands`` is one evaluation (a comma-separated list of module names kept in float32
together). ``NAME:out`` instead leaves the module in bfloat16 and casts only its outputs to
float32 (what follows it, e.g. the post-processing's sigmoids, then runs in float32). The
score layers that ``TEST.FLOAT32_SCORES`` keeps in float32 stay so in every bfloat16 run
unless the override ``TEST.FLOAT32_SCORES False`` is given (then only the islands are).
Prints one row per evaluation (headline metrics and AP50 / AP75) and writes
``OUTPUT/islands.json``.
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--weights", required=True, metavar="FILE")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--islands", action="append", default=[], metavar="NAMES",
                   help="comma-separated module names kept in float32 together (repeatable: one evaluation each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def outputs_cast(module):
    """``module`` runs as it did (bfloat16 under autocast), its floating outputs cast to
    float32 (``NAME:out``). Returns a function that undoes it."""
    from d2seg.engine.precision import outputs_to_float32

    inner = module.forward
    module.forward = lambda *args, **kwargs: outputs_to_float32(inner(*args, **kwargs))
    return lambda: module.__dict__.pop("forward", None)


def metrics(results):
    out = {}
    for task in ("bbox", "segm", "sem_seg"):
        if task in results:
            r = results[task]
            keys = ("mIoU",) if task == "sem_seg" else ("AP", "AP50", "AP75")
            out[task] = {k: round(float(r[k]), 2) for k in keys if k in r}
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import d2seg  # noqa: F401
    from d2seg.engine import AtomicCheckpointer, Trainer, setup_cfg
    from d2seg.engine.precision import float32_modules

    def cfg_for(precision, name):
        return setup_cfg(args.config_file, list(args.opts) + [
            "MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu", "TEST.PRECISION", precision,
            "OUTPUT_DIR", os.path.join(args.output, name)])

    model = Trainer.build_model(cfg_for("float32", "float32")).eval()
    AtomicCheckpointer(model).load(args.weights)
    modules = dict(model.named_modules())
    runs = [("float32", "float32", []), ("bfloat16", "bfloat16", [])]
    for i, spec in enumerate(args.islands):
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n.split(":")[0] not in modules or n.split(":")[1:] not in ([], ["out"])]
        if unknown:
            print(f"error: --islands {spec}: no module named {', '.join(unknown)} in {type(model).__name__}",
                  file=sys.stderr)
            return 2
        runs.append((f"bf16, float32: {spec}", "bfloat16", names))
    rows = []
    for i, (label, precision, names) in enumerate(runs):
        undo = [outputs_cast(modules[n[:-4]]) for n in names if n.endswith(":out")]
        start = time.perf_counter()
        try:
            with float32_modules(model, [n for n in names if not n.endswith(":out")]):
                results = Trainer.test(cfg_for(precision, f"run{i}"), model)
        finally:
            for u in undo:
                u()
        rows.append({"run": label, "islands": names, "metrics": metrics(results),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "islands.json"), "w") as f:
        json.dump({"config": args.config_file, "weights": os.path.abspath(args.weights), "opts": args.opts,
                   "runs": rows}, f, indent=1)
    base = rows[0]["metrics"]
    print("| run | " + " | ".join(f"{t} {k}" for t in base for k in base[t]) + " |")
    for r in rows:
        print(f"| {r['run']} | " + " | ".join(f"{r['metrics'][t][k]:.2f}" for t in base for k in base[t]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
