#!/usr/bin/env python
"""int8 through ONNX Runtime's static quantization (issue 30): one model exported by
``d2seg.deploy.export_onnx`` at a fixed size, quantized by
``onnxruntime.quantization.quantize_static`` with calibration images of ``shapes_train``, then
(``--eval``) both files' AP on DATASETS.TEST through tools/eval_onnx.py's evaluator and
(``--repeats N``) both files timed alternately under ONNX Runtime.

    # AP: a trained shapes model, 64 calibration images, float32 file against int8 file
    OMP_NUM_THREADS=1 python dev/bench/int8_onnx.py --config-file configs/FCOS/fcos_R18_shapes.yaml \\
        --weights model_final.pth --calib 64 --eval --output /tmp/int8/fcos
    # speed: the COCO R-50 model, random weights, 800x1067, one thread, 3 alternating rounds
    OMP_NUM_THREADS=1 python dev/bench/int8_onnx.py --config-file configs/FCOS/R_50_1x.yaml \\
        --weights "" --size 800 1067 --calib 8 --repeats 3 --output /tmp/int8/fcos_r50

What runs:

* export: ``export_onnx(model, OUTPUT/float32.onnx, cfg, height=H, width=W)``, a fixed-size graph
  (``--size``; default INPUT.MIN_SIZE_TEST squared rounded up to the size divisibility, the
  shapes images' own 128x128);
* calibration: the first ``--calib`` images of ``--calib-dataset`` (default ``shapes_train``,
  generated if missing) through d2seg's test loader (the config's test resize), fed *by*
  ``ONNXModel.run`` (its session replaced by a recorder), so the calibration inputs are exactly
  what the evaluation feeds the graph: ``images`` (1, 3, H, W) float32 0-255 in INPUT.FORMAT,
  resized bilinearly to the export size, and ``output_size`` (2,) int64;
* quantization: QDQ format, weights int8 per output channel, activations ``--activation-type``
  (uint8 by default: ONNX Runtime's CPU provider runs the DequantizeLinear -> Conv ->
  QuantizeLinear groups as int8 QLinearConv with uint8 inputs and int8 weights; with int8
  activations it rewrites them to uint8 only where a QuantizeLinear feeds a single node, and
  leaves the other convolutions, e.g. a residual block's first one, in float32 on dequantized
  weights), ``--calibrate-method`` (MinMax by default). One DequantizeLinear per consumer
  (``DedicatedQDQPair``); the ReLUs right after the quantized convolutions are quantized with
  them (``--no-relu``: not). Only the nodes of
  ``--op-types`` (default ``Conv``) whose weight is a constant of the file are quantized:
  the network's learned convolutions (and fully-connected layers with ``MatMul,Gemm``), not the
  post-processing (thresholds, NMS, box decoding, the mask pasting's matrix products, dynamic
  convolutions whose weights are computed), which stays float32. The int8 file keeps the float
  file's d2seg metadata (``d2seg.quantization`` added), so ``ONNXModel`` and
  ``tools/eval_onnx.py`` read it;
* ``--eval``: ``tools/eval_onnx.py``'s ``evaluate`` on both files (``ONNXModel`` with
  ``--threads`` intra-op threads + ``Trainer.test``: COCOEvaluator on DATASETS.TEST), each
  evaluator's files under ``OUTPUT/eval_<float32|int8>/``;
* ``--repeats N``: one noise image at the export size; after one untimed call each (whose
  detections are compared), N rounds timing float32 then int8 (``ONNXModel``, ``--threads``);
  medians, per-round ratios float32 / int8 (> 1: int8 faster).

``OUTPUT/results.json`` holds the settings, the quantized node counts, both files' results and
timings, and the command.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes_val_backends import REPO, _clean, _tool, begin_run  # noqa: E402  (tools/ loader, strict-JSON cleaning, start-up)

SIDES = ("float32", "int8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--weights", required=True, metavar="FILE",
                   help='the checkpoint (MODEL.WEIGHTS); "" for random weights (seed 0)')
    p.add_argument("--output", required=True, metavar="DIR", help="folder for both .onnx files and results.json")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="fixed export size (default: INPUT.MIN_SIZE_TEST squared, rounded up to the size divisibility)")
    p.add_argument("--calib", type=int, default=32, metavar="N", help="calibration images (default 32)")
    p.add_argument("--calib-dataset", default="shapes_train", help="calibration data set (default shapes_train)")
    p.add_argument("--op-types", default="Conv",
                   help="comma-separated ONNX op types quantized where their weight is a constant (default Conv)")
    p.add_argument("--activation-type", choices=("int8", "uint8"), default="uint8",
                   help="activation type (default uint8: ONNX Runtime's x86 int8 convolutions take uint8 inputs; "
                        "with int8 it converts only the tensors that feed one node, and the convolutions on the "
                        "others stay float32; weights are always int8, per channel)")
    p.add_argument("--no-relu", action="store_true",
                   help="leave the ReLUs after the quantized convolutions in float32 (default: quantized with them)")
    p.add_argument("--calibrate-method", choices=("MinMax", "Entropy", "Percentile"), default="MinMax")
    p.add_argument("--eval", action="store_true", help="AP of both files on DATASETS.TEST (tools/eval_onnx.py)")
    p.add_argument("--repeats", type=int, default=0, metavar="N",
                   help="alternating timed rounds float32 / int8 on a noise image at the export size (default 0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    if args.calib < 1:
        p.error(f"--calib {args.calib}: at least one calibration image is needed")
    args.op_types = [t for t in args.op_types.split(",") if t]
    if not args.op_types:
        p.error("--op-types: give at least one ONNX op type (e.g. Conv)")
    return args


class _Recorder:
    """Stands in for an ONNX Runtime session inside ``ONNXModel``: records the feeds it is given."""

    def __init__(self):
        self.feeds = []

    def run(self, output_names, feeds):
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return []


def calibration_feeds(cfg, onnx_path, dataset, count):
    """The graph inputs of the first ``count`` images of ``dataset``, as ``ONNXModel`` feeds them
    during evaluation (d2seg's test loader, then ``ONNXModel.run``)."""
    from d2seg.data import prepare_datasets
    from d2seg.deploy import ONNXModel
    from d2seg.engine import Trainer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN = (dataset,)
    prepare_datasets(cfg)  # generates the shapes images if missing (other names: must be registered)
    onnx_model = ONNXModel(onnx_path, cfg)
    recorder = onnx_model.session = _Recorder()
    loader = Trainer.build_test_loader(cfg, dataset)
    for batch in loader:
        for x in batch:
            h, w = x.get("height", x["image"].shape[-2]), x.get("width", x["image"].shape[-1])
            onnx_model.run(x["image"], h, w)
        if len(recorder.feeds) >= count:
            break
    if len(recorder.feeds) < count:
        raise ValueError(f"--calib {count}: {dataset} has only {len(recorder.feeds)} images")
    return recorder.feeds[:count]


def weighted_nodes(model_proto, op_types):
    """Names of the nodes of ``op_types`` whose weight (input 1) is an initializer or a Constant's
    output: the learned layers; a node without a name gets one (quantize_static selects by name)."""
    constants = {i.name for i in model_proto.graph.initializer}
    constants |= {o for n in model_proto.graph.node if n.op_type == "Constant" for o in n.output}
    # the TorchScript exporter passes some parameters (e.g. biases equal to another's) through
    # Identity nodes; quantize_static quantizes only weights and biases that are initializers
    identity = {n.output[0]: n.input[0] for n in model_proto.graph.node if n.op_type == "Identity"}

    def source(name):
        seen = name
        while seen in identity:
            seen = identity[seen]
        return seen if seen in constants else name

    names, skipped = [], 0
    for i, node in enumerate(model_proto.graph.node):
        if node.op_type not in op_types:
            continue
        if not node.name:
            node.name = f"{node.op_type}_{i}_d2seg"
        for j in range(1, len(node.input)):
            node.input[j] = source(node.input[j])
        if len(node.input) > 1 and node.input[1] in constants:
            names.append(node.name)
        else:
            skipped += 1
    _unshare_biases(model_proto, set(names))
    return names, skipped


def following_relus(model_proto, selected):
    """Names of the Relu nodes whose input is the output of a node of ``selected`` (the network's
    Conv + ReLU pairs): quantized too, quantize_static drops them into the convolution's output
    range, so that ONNX Runtime runs the pair as one int8 convolution."""
    outputs = {o for n in model_proto.graph.node if n.name in selected for o in n.output}
    return [n.name for n in model_proto.graph.node if n.op_type == "Relu" and n.name and n.input[0] in outputs]


def _unshare_biases(model_proto, selected):
    """A bias initializer shared by convolutions of different weights (the exporter merges equal
    initializers: e.g. the zero biases of a random model's towers) gets one copy per weight, so
    that each int32 bias belongs to one weight (its scale is input scale x that weight's scales).
    A weight shared with its bias by several nodes (the heads applied to every FPN level) stays
    shared: quantize_static gives each node its own quantized bias."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model_proto.graph.initializer}
    weights_of = {}
    for node in model_proto.graph.node:
        if node.name in selected and len(node.input) > 2 and node.input[2] in inits:
            weights_of.setdefault(node.input[2], set()).add(node.input[1])
    for node in model_proto.graph.node:
        if node.name in selected and len(node.input) > 2 and len(weights_of.get(node.input[2], ())) > 1:
            name = f"{node.input[2]}_for_{node.input[1]}"
            if name not in inits:
                inits[name] = numpy_helper.from_array(numpy_helper.to_array(inits[node.input[2]]), name)
                model_proto.graph.initializer.append(inits[name])
            node.input[2] = name


def quantize(float_path, int8_path, feeds, op_types, activation_type="uint8", calibrate_method="MinMax",
             fuse_relu=True):
    """``quantize_static`` (QDQ, per-channel int8 weights, ``activation_type`` activations) of
    ``float_path`` into ``int8_path``, only the constant-weight nodes of ``op_types`` (and the
    ReLUs right after them unless not ``fuse_relu``); the float file's d2seg metadata copied.
    Returns a dict describing what was quantized."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    class Reader(CalibrationDataReader):
        """The feeds, one at a time, within the range quantize_static sets (CalibStridedMinMax)."""

        def __init__(self, items):
            self.items = list(items)
            self.pos, self.end = 0, len(self.items)

        def get_next(self):
            if self.pos >= self.end:
                return None
            self.pos += 1
            return self.items[self.pos - 1]

        def __len__(self):
            return len(self.items)

        def set_range(self, start_index, end_index):
            self.pos, self.end = start_index, min(end_index, len(self.items))

        def rewind(self):
            self.pos, self.end = 0, len(self.items)

    proto = onnx.load(float_path)
    nodes, skipped = weighted_nodes(proto, op_types)
    if not nodes:
        raise ValueError(f"{float_path}: no node of {','.join(op_types)} with a constant weight to quantize")
    relus = following_relus(proto, set(nodes)) if fuse_relu else []
    named = os.path.splitext(int8_path)[0] + ".named.onnx"  # the float file with every selected node named
    onnx.save(proto, named)
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[activation_type]
    try:
        quantize_static(
            named, int8_path, Reader(feeds), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types) + (["Relu"] if relus else []), nodes_to_quantize=nodes + relus,
            per_channel=True, activation_type=qtype, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, calibrate_method),
            # DedicatedQDQPair: one DequantizeLinear per consumer of a quantized tensor.
            # CalibStridedMinMax 1: the calibrator runs one image per collection and merges the results
            # (MinMax: min / max of the per-image ranges, as over all at once); the histogram methods
            # (Percentile, Entropy) otherwise stack every image's tensor, which fails where a tensor's
            # shape depends on the image (the ROI heads' per-proposal, the per-instance mask heads')
            extra_options={"DedicatedQDQPair": True, "CalibStridedMinMax": 1})
        # (no CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrator drops the batches it
        # clears there; MinMax keeps per image only the ReduceMin / ReduceMax scalars anyway)
    finally:
        os.remove(named)
    out = onnx.load(int8_path)
    meta = {p.key: p.value for p in proto.metadata_props}
    meta["d2seg.quantization"] = (f"onnxruntime {_ort_version()} quantize_static QDQ, weights int8 per channel, "
                                  f"activations {activation_type}, {calibrate_method}, {len(feeds)} calibration "
                                  f"images, {len(nodes)} {','.join(op_types)} nodes"
                                  + (f" and the {len(relus)} Relu after them" if relus else ""))
    del out.metadata_props[:]
    for k, v in meta.items():
        entry = out.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(out, int8_path)
    counts = {}
    for n in out.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"nodes_quantized": len(nodes), "relus_quantized": len(relus), "nodes_skipped_dynamic_weight": skipped,
            "qdq_nodes": counts, "settings": meta["d2seg.quantization"], "fused_by_onnxruntime": fused_ops(int8_path)}


def fused_ops(path):
    """Op type counts of the int8 file as ONNX Runtime's CPU provider optimises it (one thread):
    QLinearConv = convolutions that run in int8; a Conv left there runs in float32 on
    dequantized weights."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    return {k: ops.count(k) for k in ("QLinearConv", "Conv", "QuantizeLinear", "DequantizeLinear", "Relu")
            if ops.count(k)}


def _ort_version():
    import onnxruntime

    return onnxruntime.__version__


def compare(a, b):
    """One line on two results of the same image: detections, and how far apart the common best ones are."""
    a, b = a["instances"], b["instances"]
    text = f"detections: float32 {len(a)}, int8 {len(b)}"
    n = min(len(a), len(b))
    if n:
        sa, sb = a.scores.sort(descending=True).values[:n], b.scores.sort(descending=True).values[:n]
        text += f"; max |sorted score diff| {(sa - sb).abs().max():.3e}"
    return text


def time_sides(models, h, w, repeats):
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w}]
    first = {k: m(inputs)[0] for k, m in models.items()}
    line = compare(first["float32"], first["int8"])
    wall = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(inputs)
            wall[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {"size": [h, w], "repeats": repeats, "seconds": wall, "median": med,
            "float32_over_int8": med["float32"] / med["int8"],
            "per_round": [a / b for a, b in zip(wall["float32"], wall["int8"])],
            "first_call": line, "load_1min": os.getloadavg()[0]}


def main(argv=None):
    args = parse_args(argv)
    logger = begin_run(args, weights_required=False)
    if logger is None:
        return 2
    from d2seg.deploy import ONNXModel, export_onnx, read_metadata
    from d2seg.engine import AtomicCheckpointer, Trainer, setup_cfg
    cfg = setup_cfg(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu",
                                                          "TEST.PRECISION", "float32"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    if args.weights:
        AtomicCheckpointer(model).load(args.weights)
    paths = {s: os.path.join(args.output, f"{s}.onnx") for s in SIDES}
    report = {"config": args.config_file, "weights": os.path.abspath(args.weights) if args.weights else "",
              "opts": list(args.opts), "threads": args.threads, "torch": torch.__version__,
              "onnxruntime": _ort_version(),
              "command": shlex.join([os.path.relpath(os.path.abspath(__file__), REPO)]
                                    + (list(argv) if argv is not None else sys.argv[1:]))}

    t0 = time.perf_counter()
    size = args.size or (None, None)
    export_onnx(model, paths["float32"], cfg, height=size[0], width=size[1], dynamic=False)
    meta = read_metadata(paths["float32"])
    h, w = int(meta["d2seg.height"]), int(meta["d2seg.width"])
    report["size"] = [h, w]
    report["export_seconds"] = round(time.perf_counter() - t0, 1)
    del model

    t0 = time.perf_counter()
    feeds = calibration_feeds(cfg, paths["float32"], args.calib_dataset, args.calib)
    report["calibration"] = {"dataset": args.calib_dataset, "images": len(feeds),
                             "feeds": {k: [list(v.shape), str(v.dtype)] for k, v in feeds[0].items()}}
    report["quantization"] = quantize(paths["float32"], paths["int8"], feeds, args.op_types,
                                      args.activation_type, args.calibrate_method, not args.no_relu)
    report["quantization_seconds"] = round(time.perf_counter() - t0, 1)
    del feeds
    logger.info(f"int8: {report['quantization']}")
    report["file_mb"] = {s: round(os.path.getsize(p) / 1e6, 2) for s, p in paths.items()}

    if args.eval:
        evaluate = _tool("eval_onnx").evaluate
        report["eval"] = {}
        for side in SIDES:
            scfg = cfg.clone()
            scfg.defrost()
            scfg.OUTPUT_DIR = os.path.join(args.output, f"eval_{side}")
            t0 = time.perf_counter()
            report["eval"][side] = {"results": evaluate(paths[side], scfg, num_threads=args.threads),
                                    "seconds": round(time.perf_counter() - t0, 1)}
        diff = {}
        for task, metrics in report["eval"]["float32"]["results"].items():
            other = report["eval"]["int8"]["results"].get(task, {})
            diff[task] = {m: other[m] - v for m, v in metrics.items()
                          if m in other and math.isfinite(v) and math.isfinite(other[m])}
        report["eval"]["int8_minus_float32"] = diff

    if args.repeats:
        models = {s: ONNXModel(paths[s], cfg, num_threads=args.threads) for s in SIDES}
        with torch.no_grad():
            report["timing"] = time_sides(models, h, w, args.repeats)

    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(_clean(report), f, indent=1)
    print(f"{args.config_file} exported at {h}x{w}; int8: {report['quantization']['settings']}; "
          f"QDQ nodes {report['quantization']['qdq_nodes']}; files {report['file_mb']} MB; ONNX Runtime's "
          f"optimised int8 graph: {report['quantization']['fused_by_onnxruntime']}")
    if args.eval:
        for task, d in report["eval"]["int8_minus_float32"].items():
            f32, i8 = report["eval"]["float32"]["results"][task], report["eval"]["int8"]["results"][task]
            print(f"  {task}: AP float32 {f32['AP']:.2f}, int8 {i8['AP']:.2f} ({d.get('AP', float('nan')):+.2f}); "
                  f"AP50 {f32['AP50']:.2f} / {i8['AP50']:.2f}, AP75 {f32['AP75']:.2f} / {i8['AP75']:.2f}")
    if args.repeats:
        t = report["timing"]
        print(f"  {t['first_call']}")
        print(f"  {args.threads} thread(s), {args.repeats} rounds, load {t['load_1min']:.2f}: float32 median "
              f"{t['median']['float32']:.3f} s, int8 median {t['median']['int8']:.3f} s, float32 / int8 "
              f"{t['float32_over_int8']:.2f}x (per round {', '.join(f'{r:.2f}' for r in t['per_round'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
