#!/usr/bin/env python
"""One model in PyTorch float32 and exported to ONNX Runtime, alternating in one process, with
an optional per-operator profile of both (where the exported graph spends its time).

    # MEInst R-50 at 800x1067, one thread, 100 detections, 3 rounds, profiles of both sides
    OMP_NUM_THREADS=1 python dev/bench/onnx_profile.py --config-file configs/MEInst/MEInst_R_50_1x.yaml \\
        --input-size 800 1067 --repeats 3 --random-encoding --profile /tmp/prof \\
        MODEL.WEIGHTS "" MODEL.FCOS.INFERENCE_TH_TEST 0

The model is built from the config (random weights unless MODEL.WEIGHTS), exported by
``d2seg.deploy.export_onnx`` at the input size (the fixed-size file of
dev/reference/reference_speed.py) into a temporary folder, and run by ``d2seg.deploy.ONNXModel``
with ``--threads`` intra-op threads; PyTorch runs with as many threads. One noise image at the
input size (no test resize), the output at the same size. After one untimed call each (which
also compares the two sides' detections), every round times PyTorch then ONNX Runtime. Prints
the medians, min and the PyTorch / ONNX Runtime ratio of the medians (> 1: ONNX Runtime faster).
``--also-onnx FILE`` adds a third side timed in the same rounds (a file exported before a change
of the graph: before and after under the same load).

``--random-encoding``: MEInst configs with an empty MODEL.MEINST.PATH_COMPONENTS learn their
encoding from DATASETS.TRAIN when built; this fits one to random discs instead (no data needed).

``--profile DIR``: one more call of each side under a profiler. ONNX Runtime: a session with
``SessionOptions.enable_profiling`` (same options as ONNXModel's), its trace in DIR and the
totals per operator type and the slowest nodes printed; PyTorch: ``torch.profiler`` totals per
operator (self CPU time). ``--top N`` rows each.
"""
import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--input-size", type=int, nargs=2, default=(800, 1067), metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--random-encoding", action="store_true",
                   help="MEInst: a mask encoding fitted to random discs (MODEL.MEINST.PATH_COMPONENTS)")
    p.add_argument("--onnx", default="", help="keep the exported file here (default: a temporary folder, removed)")
    p.add_argument("--also-onnx", default="", metavar="FILE",
                   help="time this exported file too, as a third side (e.g. one exported before a change, with "
                        "the same seed and overrides): its own stored config")
    p.add_argument("--profile", default="", metavar="DIR", help="profile one call of each side; traces in DIR")
    p.add_argument("--top", type=int, default=15, help="rows of each profile table (default 15)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def random_disc_encoding(path: str, size: int, components: int, n: int = 400, seed: int = 0) -> str:
    """A MEInst encoding (m = ``size``, N = ``components``) fitted to ``n`` random discs."""
    from d2seg.meinst import MaskStatistics, save_encoding

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand(n, 2, generator=g) * size
    radii = 2 + torch.rand(n, generator=g) * size / 2
    masks = ((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
             <= radii[:, None, None] ** 2).float()
    stats = MaskStatistics(size, sigmoid=True)
    stats.update(masks)
    save_encoding(path, stats.fit(components, whiten=True))
    return path


def compare(a, b) -> str:
    """One line: detections of both sides, and how far apart (sorted scores, masks)."""
    a, b = a["instances"], b["instances"]
    text = f"detections: PyTorch {len(a)}, ONNX Runtime {len(b)}"
    if len(a) == len(b) and len(a):
        a, b = a[a.scores.argsort(descending=True)], b[b.scores.argsort(descending=True)]
        text += f"; max |score diff| {(a.scores - b.scores).abs().max():.2e}"
        text += f", max |box diff| {(a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max():.2e}"
        if a.has("pred_masks"):
            differ = (a.pred_masks != b.pred_masks).sum().item()
            text += f", mask pixels that differ {differ} of {a.pred_masks.numel()}"
    return text


def ort_profile(path: str, feeds, threads: int, out_dir: str, top: int) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(out_dir, "ort")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)  # warm-up (the profile covers it too: only the last run is summed)
    t0 = time.perf_counter()
    sess.run(None, feeds)
    wall = time.perf_counter() - t0
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = runs[-1]
    start, end = last["ts"], last["ts"] + last["dur"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and start <= e["ts"] <= end]
    by_type, by_node = collections.Counter(), collections.Counter()
    count = collections.Counter()
    for e in nodes:
        op = e["args"].get("op_name", "?")
        by_type[op] += e["dur"]
        count[op] += 1
        by_node[(e["name"][: -len("_kernel_time")], op)] += e["dur"]
    total = sum(by_type.values())
    print(f"\nONNX Runtime profile ({trace}): run {wall:.3f} s wall, kernels {total / 1e6:.3f} s, "
          f"{len(nodes)} nodes; graph optimisation level {opts.graph_optimization_level}")
    print(f"  {'op type':28s} {'nodes':>6s} {'seconds':>9s} {'share':>6s}")
    for op, us in by_type.most_common(top):
        print(f"  {op:28s} {count[op]:6d} {us / 1e6:9.3f} {us / total:6.1%}")
    print(f"  {'slowest nodes':60s} {'op type':20s} {'seconds':>9s}")
    for (name, op), us in by_node.most_common(top):
        print(f"  {name[-60:]:60s} {op:20s} {us / 1e6:9.3f}")


def torch_profile(model, inputs, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        model(inputs)
        wall = time.perf_counter() - t0
    print(f"\nPyTorch profile: run {wall:.3f} s wall (profiler on)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None):
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="onnx_profile_")
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: str) -> int:
    torch.set_num_threads(args.threads)
    import d2seg  # noqa: F401  (registers every method)
    from d2seg.deploy import ONNXModel, export_onnx
    from d2seg.engine import AtomicCheckpointer, Trainer, setup_cfg

    opts = list(args.opts) + ["MODEL.DEVICE", "cpu"]
    if args.random_encoding:
        probe = setup_cfg(args.config_file, opts + ["MODEL.MEINST.PATH_COMPONENTS", "unused.npz"])
        mc = probe.MODEL.MEINST
        opts += ["MODEL.MEINST.PATH_COMPONENTS",
                 random_disc_encoding(os.path.join(tmp, "encoding.npz"), mc.MASK_SIZE, mc.DIM_MASK)]
    cfg = setup_cfg(args.config_file, opts)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    h, w = args.input_size
    path = args.onnx or os.path.join(tmp, "model.onnx")
    t0 = time.perf_counter()
    export_onnx(model, path, cfg, height=h, width=w)
    print(f"exported {path} in {time.perf_counter() - t0:.1f} s")
    onnx_model = ONNXModel(path, cfg, num_threads=args.threads)

    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w}]
    sides = {"pytorch": model, "onnxruntime": onnx_model}
    if args.also_onnx:
        sides["also_onnx"] = ONNXModel(args.also_onnx, num_threads=args.threads)
    wall = {k: [] for k in sides}
    with torch.no_grad():
        first = {k: fn(inputs)[0] for k, fn in sides.items()}
        print(compare(first["pytorch"], first["onnxruntime"]))
        if args.also_onnx:
            print(f"{args.also_onnx}: " + compare(first["pytorch"], first["also_onnx"]))
        for _ in range(args.repeats):
            for k, fn in sides.items():
                t0 = time.perf_counter()
                fn(inputs)
                wall[k].append(time.perf_counter() - t0)
    load = os.getloadavg()[0]
    print(f"{args.config_file} at {h}x{w}, {args.threads} thread(s), {args.repeats} rounds, load {load:.2f}, "
          f"torch {torch.__version__}")
    for k in sides:
        print(f"  {k:12s} median {statistics.median(wall[k]):.3f} s, min {min(wall[k]):.3f} s  "
              f"({', '.join(f'{t:.2f}' for t in wall[k])})")
    for k in list(sides)[1:]:
        ratios = [a / b for a, b in zip(wall["pytorch"], wall[k])]
        print(f"  PyTorch / {k}: {statistics.median(wall['pytorch']) / statistics.median(wall[k]):.2f}x "
              f"(per round {', '.join(f'{r:.2f}' for r in ratios)})")

    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        x = inputs[0]["image"][None].contiguous().numpy()
        feeds = {"images": x, "output_size": np.array([h, w], np.int64)}
        ort_profile(path, feeds, args.threads, args.profile, args.top)
        torch_profile(model, inputs, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
