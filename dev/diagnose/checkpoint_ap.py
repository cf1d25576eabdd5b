"""AP of every checkpoint a training saved: is the model still learning when the budget ends?

    OMP_NUM_THREADS=1 python dev/diagnose/checkpoint_ap.py \
        --config-file configs/CondInst/condinst_R18_shapes.yaml --checkpoints output/CondInst/condinst_R18_shapes

`--checkpoints` takes checkpoint files or training output folders (every `model_*.pth` in one,
`model_final.pth` last). The model is built once from the config (plus any trailing `KEY VALUE`
overrides, as tools/train_net.py takes them) and each checkpoint is evaluated on
`DATASETS.TEST` with the evaluator `tools/train_net.py --eval-only` uses. Prints one markdown
row per checkpoint (box, mask and semantic AP / mIoU where the model has them) and, with
`--output`, writes the rows as JSON.
"""
import argparse
import glob
import json
import logging
import os
import re
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.logger import setup_logger

import d2seg  # noqa: F401  (registers the methods and the built-in data sets)
from d2seg.engine import Trainer, setup_cfg

COLUMNS = (("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"),
           ("segm", "AP75"), ("segm", "APs"), ("sem_seg", "mIoU"))


def checkpoint_files(paths):
    """Checkpoint files in training order: a folder gives its model_*.pth, model_final.pth last."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "model_*.pth")),
                           key=lambda f: (os.path.basename(f) == "model_final.pth", f))
            if not found:
                raise FileNotFoundError(f"no model_*.pth in {p}")
            final = [f for f in found if os.path.basename(f) == "model_final.pth"]
            if final:  # the last periodic checkpoint is model_final.pth's weights again
                last = iteration_of(final[0])
                found = [f for f in found if f in final or iteration_of(f) != last]
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no checkpoint or folder {p}")
    return files


def iteration_of(path):
    """Iterations trained when `path` was saved: model_0001499.pth -> 1500; None if unknown."""
    m = re.fullmatch(r"model_(\d+)\.pth", os.path.basename(path))
    if m:
        return int(m.group(1)) + 1
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    it = ckpt.get("iteration") if isinstance(ckpt, dict) else None
    return None if it is None else int(it) + 1


def flatten(results):
    """Detectron2's nested results -> {(task, metric): value} for the table's columns."""
    return {(task, key): float(results[task][key]) for task, key in COLUMNS
            if task in results and key in results[task]}


def markdown(rows):
    cols = [c for c in COLUMNS if any(c in r["metrics"] for r in rows)]
    head = "| checkpoint | iteration | " + " | ".join(f"{t} {k}" for t, k in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        vals = " | ".join(f"{r['metrics'][c]:.1f}" if c in r["metrics"] else "–" for c in cols)
        lines.append(f"| {os.path.basename(r['checkpoint'])} | {r['iteration'] or '?'} | {vals} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint files or output folders")
    parser.add_argument("--output", help="write the rows as JSON to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    files = checkpoint_files(args.checkpoints)
    setup_logger(name="d2seg")
    log = logging.getLogger("d2seg")
    cfg = setup_cfg(args.config_file, args.opts + ["MODEL.WEIGHTS", ""], freeze=False)
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    cfg.freeze()
    model = Trainer.build_model(cfg)
    rows = []
    for f in files:
        DetectionCheckpointer(model).load(f)
        res = Trainer.test(cfg, model)
        rows.append({"checkpoint": f, "iteration": iteration_of(f),
                     "metrics": flatten(res)})
        log.info("%s: %s", f, rows[-1]["metrics"])
    print(markdown(rows))
    if args.output:
        with open(args.output, "w") as fh:
            json.dump([{**r, "metrics": {f"{t}/{k}": v for (t, k), v in r["metrics"].items()}} for r in rows],
                      fh, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
