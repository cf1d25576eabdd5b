#!/usr/bin/env python
"""Benchmark every shapes config (or the given ones): inference latency (median and
p10-p90 over repeated runs after warm-up), images/s and peak memory; training iteration
time and peak memory; with the input size, threads and detection count of each row.

    # every configs/**/*shapes*.yaml, Mask R-CNN (the yardstick) first, 1 thread, CPU
    python tools/benchmark.py
    # the same with every test-time score threshold at 0 (every model returns its
    # maximum number of detections, so rows are compared at equal output counts)
    python tools/benchmark.py --all-detections
    # one config at a paper-like input size, inference only
    python tools/benchmark.py --config-file configs/SOLO/solov2_shapes.yaml \
        --input-size 800 1088 --no-train
    # each config's own trained model (<OUTPUT_DIR>/model_final.pth) where it exists,
    # with the configs' own score thresholds
    python tools/benchmark.py --trained --no-train
    # trained weights (one config): trailing KEY VALUE pairs go to every config
    python tools/benchmark.py --config-file configs/quick/mask_rcnn_shapes.yaml \
        MODEL.WEIGHTS output/quick/mask_rcnn_shapes/model_final.pth

Every (config, phase) runs in its own fresh subprocess, one at a time, with
OMP_NUM_THREADS=--threads, so peak memory never mixes and the whole run uses one CPU slot.
Writes <output>/benchmark.md (the table), benchmark.png (bar chart), benchmark.json (all
numbers) and logs/ (each subprocess's output). Exit status 1 if any config failed (the
table is still written, with the error in that row), 2 on bad arguments.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark_package():
    """d2seg.benchmark's stdlib-only parts (configs, report, stats), loaded without
    importing d2seg itself (torch, Detectron2, every method): this process only spawns
    the measuring subprocesses and writes the report, so it stays small and starts fast."""
    import importlib.util

    name = "_d2seg_benchmark_report"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("d2seg")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("d2seg is not installed: run `make install` first")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "benchmark")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.report = importlib.import_module(f"{name}.report")
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", action="append", default=None, metavar="FILE",
                   help="a config to run; repeat for several (default: every configs/**/*shapes*.yaml, "
                        "the yardstick first)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="resize every input (inference and training) to H x W "
                        "(default: the config's own test/train size, 128 px for shapes)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per subprocess (default 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed inference calls (default 5)")
    p.add_argument("--repeats", type=int, default=30, help="timed inference calls (default 30)")
    p.add_argument("--batch-size", type=int, default=1, help="images per inference call (default 1)")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed training iterations (default 2)")
    p.add_argument("--train-iters", type=int, default=5, help="timed training iterations (default 5)")
    p.add_argument("--no-train", action="store_true", help="measure inference only")
    p.add_argument("--all-detections", action="store_true",
                   help="set every test-time score threshold (ROI_HEADS/RETINANET.SCORE_THRESH_TEST, "
                        "FCOS.INFERENCE_TH_TEST, SOLO.SCORE_THR/UPDATE_THR, SPARSE_INST.CLS_THRESHOLD, ...) "
                        "to 0 so every model returns its maximum number of detections")
    p.add_argument("--trained", action="store_true",
                   help="load each config's <OUTPUT_DIR>/model_final.pth where it exists (random init elsewhere; "
                        "the table says which)")
    p.add_argument("--output", default=os.path.join("output", "benchmark"),
                   help="output folder (default output/benchmark)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per subprocess (default 900)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no further config (or phase) once S seconds have passed; with it, every "
                        "config's inference runs first, then the training runs; what was not measured is "
                        "listed under the table and in benchmark.json (not an error)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every config")
    args = p.parse_args(argv)

    def fail(msg):
        p.error(msg)  # exit status 2

    if args.config_file is None:
        args.config_file = _benchmark_package().discover_shapes_configs(REPO)
        if not args.config_file:
            fail(f"no configs/**/*shapes*.yaml found under {REPO}")
    for c in args.config_file:
        if not os.path.isfile(c):
            fail(f"--config-file: config file not found: {c}")
        if not c.endswith((".yaml", ".yml")):
            fail(f"--config-file: not a YAML config: {c}")
    if args.time_budget is not None and args.time_budget < 0:
        fail("--time-budget must be >= 0")
    for name in ("threads", "repeats", "batch_size", "train_iters", "timeout"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup", "train_warmup"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0")
    if args.input_size and min(args.input_size) < 16:
        fail(f"--input-size: H and W must be >= 16, got {args.input_size}")
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        fail(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return args


def _slug(config_file):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.normpath(config_file))[0])


def run_phase(args, config_file, phase, log_dir):
    """Run one (config, phase) in a fresh subprocess; its result dict (or an error)."""
    out_json = os.path.join(log_dir, f"{_slug(config_file)}.{phase}.json")
    log_file = os.path.join(log_dir, f"{_slug(config_file)}.{phase}.log")
    cmd = [sys.executable, "-m", "d2seg.benchmark.worker", "--phase", phase, "--config-file", config_file,
           "--json-out", out_json, "--device", args.device, "--threads", str(args.threads)]
    if phase == "infer":
        cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--batch-size", str(args.batch_size)]
    else:
        cmd += ["--warmup", str(args.train_warmup), "--repeats", str(args.train_iters)]
    if args.all_detections:
        cmd.append("--all-detections")
    if args.trained:
        cmd.append("--trained")
    if args.input_size:
        cmd += ["--input-size", *map(str, args.input_size)]
    cmd += list(args.opts)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if os.path.exists(out_json):
        os.remove(out_json)
    t0 = time.time()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout} s (see {log_file})"}
    wall = time.time() - t0
    if not os.path.isfile(out_json):
        with open(log_file) as f:
            tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit status {code}: {tail[0]} (see {log_file})"}
    with open(out_json) as f:
        result = json.load(f)
    result["subprocess_wall_s"] = wall
    if "error" in result:
        result["error"] += f" (see {log_file})"
    return result


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header_lines(args, rows, started, wall_s):
    results = [r[p] for r in rows for p in ("infer", "train") if r.get(p) and "error" not in r[p]]
    torch_version = results[0].get("torch", "?") if results else "?"
    loads = [r[p]["loadavg_1min"] for r in rows for p in ("infer", "train")
             if r.get(p) and "loadavg_1min" in r[p]]
    device = (results[0].get("device_name", "?") if results else "?") if args.device == "cuda" \
        else f"{_cpu_name()} ({os.cpu_count()} logical CPUs)"
    changed = sorted({k for r in rows for p in ("infer", "train") if r.get(p)
                      for k in r[p].get("thresholds_set_to_zero", [])})
    weights = sorted({str(r[p].get("weights")) for r in rows for p in ("infer", "train")
                      if r.get(p) and "error" not in r[p]})
    precisions = sorted({r[p].get("precision", "float32") for r in rows for p in ("infer",)
                         if r.get(p) and "error" not in r[p]})
    size = (f"every input resized to {args.input_size[0]}×{args.input_size[1]}" if args.input_size
            else "each config's own test/train size (shapes: 128×128)")
    lines = [
        "# d2seg benchmark",
        "",
        f"- Command: `{' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}` "
        f"(run from the repository root)",
        f"- Date: {started} (UTC); total wall time {wall_s / 60:.1f} min",
        f"- Device: {args.device}: {device}; torch {torch_version}; "
        f"{args.threads} thread(s) per measurement (OMP_NUM_THREADS={args.threads}); "
        f"1-min load average during the run: "
        + (f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"),
        f"- Weights: {', '.join('random init' if w == 'None' else f'`{w}`' for w in weights) or '?'}",
        f"- Inference: batch {args.batch_size}, {size}, TEST.PRECISION {', '.join(precisions) or '?'} "
        f"(bfloat16: under torch.autocast), images from the config's DATASETS.TEST "
        f"(shapes_val), {args.warmup} warm-up + {args.repeats} timed calls of `model(batch)` in eval "
        f"mode under `torch.no_grad()` (pre- and post-processing included: normalisation, padding, "
        f"NMS, mask pasting at the input size)",
        "- Training: " + ("not measured (--no-train)" if args.no_train else
                          f"batch SOLVER.IMS_PER_BATCH from the trainer's data loader (loading not timed), "
                          f"{args.train_warmup} warm-up + {args.train_iters} timed iterations of forward, "
                          f"backward, optimizer step, LR-scheduler step"),
        "- Detections: " + (f"every test-time score threshold set to 0 ({', '.join(changed)}), so each "
                            "model returns its maximum number of detections"
                            if args.all_detections else
                            "each config's own score thresholds (with random weights some models return "
                            "0 detections and skip their mask post-processing; use --all-detections to compare "
                            "at equal output counts)"),
        "- Peak memory: what the phase (model build + the timed runs) added to the process's resident "
        "memory at its peak (Linux VmHWM reset at the start of the phase), one fresh process per config "
        "and phase" if args.device == "cpu" else
        "- Peak memory: torch.cuda.max_memory_allocated over the phase (model build + timed runs)",
        "- Ratios: median time over the yardstick's median time measured in the same run "
        "(Mask R-CNN `configs/quick/mask_rcnn_shapes.yaml` for instance rows, Semantic FPN "
        "`configs/quick/semantic_fpn_shapes.yaml` for semantic rows)",
    ]
    return lines


def main(argv=None):
    args = parse_args(argv)
    bench = _benchmark_package()
    method_name = bench.method_name
    add_ratios, order_rows = bench.report.add_ratios, bench.report.order_rows
    write_chart, write_markdown = bench.report.write_chart, bench.report.write_markdown

    os.makedirs(args.output, exist_ok=True)
    log_dir = os.path.join(args.output, "logs")
    os.makedirs(log_dir, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0 = time.time()
    rows = [{"config_file": os.path.relpath(c, REPO) if os.path.isabs(c) else c, "method": method_name(c),
             "infer": None, "train": None} for c in args.config_file]
    not_measured = []
    phases = ["infer"] + ([] if args.no_train else ["train"])
    # with a time budget, every config's inference first, then the training runs, so that a
    # budget cut costs training rows before it costs whole configs
    order = ([(p, i) for p in phases for i in range(len(rows))] if args.time_budget is not None
             else [(p, i) for i in range(len(rows)) for p in phases])
    for phase, i in order:
        config_file, row = args.config_file[i], rows[i]
        what = "inference" if phase == "infer" else "training"
        if phase == "train" and row["infer"] is None:
            continue  # the whole config is already listed as not measured
        if args.time_budget is not None and time.time() - t0 > args.time_budget:
            print(f"[{i + 1}/{len(rows)}] {config_file}: {what} not measured (--time-budget "
                  f"{args.time_budget:g} s spent)", flush=True)
            not_measured.append(row["config_file"] + ("" if phase == "infer" else " (training)"))
            continue
        print(f"[{i + 1}/{len(rows)}] {config_file}: {what} ...", flush=True)
        row[phase] = run_phase(args, config_file, phase, log_dir)
        _print_result(row[phase])
    rows = [r for r in rows if r["infer"] is not None]
    rows = add_ratios(order_rows(rows))
    wall = time.time() - t0
    md_path = os.path.join(args.output, "benchmark.md")
    png_path = os.path.join(args.output, "benchmark.png")
    footer = [f"![benchmark chart](benchmark.png)"]
    if not_measured:
        footer = [f"Not measured (--time-budget {args.time_budget:g} s spent): "
                  + ", ".join(f"`{c}`" for c in not_measured), ""] + footer
    title = (f"d2seg benchmark, {args.device}, {args.threads} thread(s), "
             + (f"{args.input_size[0]}×{args.input_size[1]}" if args.input_size else "config sizes (shapes: 128×128)")
             + (", all detections" if args.all_detections else "") + (", trained weights" if args.trained else ""))
    have_chart = write_chart(png_path, rows, title) if rows else False
    text = write_markdown(md_path, rows, header_lines(args, rows, started, wall), footer if have_chart else footer[:-1])
    with open(os.path.join(args.output, "benchmark.json"), "w") as f:
        json.dump({"args": vars(args), "started_utc": started, "wall_s": wall, "rows": rows,
                   "not_measured": not_measured}, f, indent=1)
    print(text)
    print(f"wrote {md_path}" + (f", {png_path}" if have_chart else " (no chart: matplotlib missing)" if rows else ""))
    failed = [r["config_file"] for r in rows for p in ("infer", "train") if r.get(p) and "error" in r[p]]
    if failed:
        print(f"FAILED: {sorted(set(failed))}", file=sys.stderr)
        return 1
    return 0


def _print_result(result):
    if "error" in result:
        print(f"    failed: {result['error']}", flush=True)
        return
    ms = result["ms"]
    det = result.get("detections")
    print(f"    median {ms['median']:.1f} ms (p10 {ms['p10']:.1f}, p90 {ms['p90']:.1f}), "
          f"peak {result['peak_mib']:.0f} MiB" + (f", {det:.1f} detections/image" if det is not None else "")
          + f" [{result.get('subprocess_wall_s', 0):.0f} s]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
