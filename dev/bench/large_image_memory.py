#!/usr/bin/env python
"""Peak memory of the demo's stages on a large photo, every shapes config (issue 26, item 8).

For each config, a fresh process builds the model (random weights, every score threshold at 0 so
that it returns up to TEST.DETECTIONS_PER_IMAGE masks), then measures what each stage adds to the
resident memory at its peak (Linux VmHWM, reset before the stage through /proc/self/clear_refs):

* predict: ``d2seg.engine.Predictor`` on the photo (the model runs at the config's test size; the
  masks are pasted at the photo's size, one bool (H, W) each);
* draw: ``tools/demo.py``'s ``visualise`` and the rendering of the picture (``--drawing d2seg``,
  the demo's) or Detectron2's ``draw_instance_predictions`` + ``get_image()`` (``--drawing
  detectron2``, what the demo did before).

"need" is what the result itself takes: the masks (N x H x W bools) and the photo (H x W x 3).

    OMP_NUM_THREADS=1 python dev/bench/large_image_memory.py                 # every shapes config
    OMP_NUM_THREADS=1 python dev/bench/large_image_memory.py --configs configs/CondInst/condinst_R18_shapes.yaml \\
        --drawing d2seg detectron2 --height 3000 --width 4000
"""
import argparse
import glob
import json
import os
import subprocess
import sys

THRESHOLD_KEYS = ["MODEL.FCOS.INFERENCE_TH_TEST", "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
                  "MODEL.RETINANET.SCORE_THRESH_TEST", "MODEL.SOLO.SCORE_THR", "MODEL.SOLO.UPDATE_THR",
                  "MODEL.SPARSE_INST.CLS_THRESHOLD"]


class _Stage:
    """Peak memory (MiB) a stage adds on top of the RSS at its start: d2seg.benchmark's PeakMemory
    (VmHWM reset through /proc/self/clear_refs at the start) as a context manager."""

    def __enter__(self):
        from d2seg.benchmark.memory import PeakMemory

        self.peak = PeakMemory("cpu")
        self.peak.start()
        return self

    def __exit__(self, *exc):
        self.added_mib = self.peak.peak_mib()


def _photo(height, width):
    """A smooth colourful photo-like image, the same for every config (BGR uint8)."""
    import cv2
    import numpy as np

    small = np.random.RandomState(0).randint(0, 255, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def worker(config, drawing, height, width):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
    import demo  # tools/demo.py
    import torch
    from detectron2.data import MetadataCatalog

    from d2seg.engine import setup_cfg

    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    opts = []
    for key in THRESHOLD_KEYS:
        node = cfg.MODEL
        parts = key.split(".")[1:]
        for p in parts[:-1]:
            node = node.get(p) if node is not None else None
        if node is not None and parts[-1] in node:
            opts += [key, 0.0]
    cfg.defrost()
    cfg.merge_from_list(opts)
    cfg.freeze()
    torch.manual_seed(0)
    predictor = demo.build_predictor(cfg)
    photo = _photo(height, width)
    with _Stage() as predict:
        out = predictor(photo)
    res = {"config": config, "drawing": drawing, "predict_mib": predict.added_mib}
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    with _Stage() as draw:
        if drawing == "d2seg":
            from d2seg.engine.drawing import render

            vis, n, _ = demo.visualise(photo[:, :, ::-1], out, meta, 0.0)
            picture = render(vis)
        else:
            from detectron2.utils.visualizer import ColorMode, Visualizer

            vis = Visualizer(photo[:, :, ::-1], meta, instance_mode=ColorMode.IMAGE)
            if "instances" in out:
                inst = out["instances"].to("cpu")
                inst = inst[inst.scores >= 0.0]
                n = len(inst)
                picture = vis.draw_instance_predictions(inst).get_image()
            else:
                n = None
                picture = vis.draw_sem_seg(out["sem_seg"].argmax(dim=0)).get_image()
    assert picture.shape == photo.shape
    res["draw_mib"] = draw.added_mib
    res["instances"] = n
    masks = n * height * width if n is not None and out["instances"].has("pred_masks") else 0
    res["need_mib"] = (masks + photo.nbytes) / 2**20
    print(json.dumps(res))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="*", default=None, help="default: every configs/*/*shapes*.yaml")
    p.add_argument("--drawing", nargs="+", default=["d2seg"], choices=["d2seg", "detectron2"])
    p.add_argument("--height", type=int, default=3000)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "DRAWING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], args.height, args.width)
        return 0
    configs = args.configs or sorted(glob.glob("configs/*/*shapes*.yaml"))
    rows = []
    print("| config | drawing | instances | predict adds MiB | draw + render adds MiB | need (masks + photo) MiB |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        for drawing in args.drawing:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", config, drawing,
                                   "--height", str(args.height), "--width", str(args.width)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {config} | {drawing} | failed: {proc.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            n = "semantic" if r["instances"] is None else r["instances"]
            print(f"| {config} | {drawing} | {n} | {r['predict_mib']:.0f} | {r['draw_mib']:.0f} | {r['need_mib']:.0f} |",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
