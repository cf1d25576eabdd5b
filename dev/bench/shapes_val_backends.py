#!/usr/bin/env python
"""One trained shapes model evaluated on its DATASETS.TEST (shapes_val) in three backends:
PyTorch float32, PyTorch at TEST.PRECISION bfloat16, and the file exported with d2seg.deploy
under ONNX Runtime. Issue 30's checks: ONNX Runtime within 0.1 AP of float32, bfloat16 within
0.3 (docs/deploy.md, "Precision").

    OMP_NUM_THREADS=1 DETECTRON2_DATASETS=datasets python dev/bench/shapes_val_backends.py \
        --config-file configs/FCOS/fcos_R18_shapes.yaml --weights output/fcos/model_final.pth \
        --output /tmp/backends/fcos [KEY VALUE ...]

What each backend runs (the same model object, loaded once, one thread):

* float32: ``Trainer.test(cfg, model)``, what ``tools/train_net.py --eval-only`` calls;
* bfloat16: the same with ``TEST.PRECISION bfloat16`` (``d2seg.engine.at_precision``; on a CPU
  without native bfloat16 it is an error, recorded, unless ``D2SEG_CPU_BF16=1``);
* onnxruntime: ``d2seg.deploy.export_onnx`` (what ``tools/export_model.py`` calls; dynamic
  height/width where the method's graph allows it, else fixed at the test size,
  INPUT.MIN_SIZE_TEST squared: 128x128 for the shapes configs, the images' own size), the
  file checked against PyTorch on one noise image (``tools/export_model.py``'s check), then
  ``tools/eval_onnx.py``'s ``evaluate`` (``ONNXModel`` + ``Trainer.test``). A model without a
  graph (Detectron2's plain RetinaNet, ``configs/FCOS/retinanet_shapes.yaml``) gets "no graph".

Each evaluation writes under ``OUTPUT/<backend>/`` (its OUTPUT_DIR: the evaluator's results
files), the ONNX file is ``OUTPUT/model.onnx``; ``OUTPUT/results.json`` holds every metric of
every backend, the headline metric (box AP, mask AP or mIoU) per backend with the differences
bfloat16 - float32 and onnxruntime - float32, the markdown rows and the command. The rows are
printed last, one per task:

    | config | task | float32 | bfloat16 | ONNX Runtime | bf16-f32 | ORT-f32 |
"""
import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ("float32", "bfloat16", "onnxruntime")
TASKS = {"bbox": ("box AP", "AP"), "segm": ("mask AP", "AP"), "sem_seg": ("mIoU", "mIoU")}
HEADER = ("| config | task | float32 | bfloat16 | ONNX Runtime | bf16-f32 | ORT-f32 |\n"
          "|---|---|---|---|---|---|---|")


def _tool(name):
    """tools/<name>.py as a module (its functions, not its __main__ block)."""
    spec = importlib.util.spec_from_file_location(f"_d2seg_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--weights", required=True, metavar="FILE", help="the checkpoint (MODEL.WEIGHTS)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for results.json, the ONNX file and "
                                                                  "each backend's evaluator files")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated subset of " + ",".join(BACKENDS) + " (default: all three)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown or not args.backends:
        p.error(f"--backends {','.join(args.backends)}: expected a comma-separated subset of {','.join(BACKENDS)}")
    return args


def headline(results):
    """Detectron2's results dict -> {task: its headline metric} (bbox/segm AP, sem_seg mIoU)."""
    out = {}
    for task, (_, metric) in TASKS.items():
        if task in results and metric in results[task]:
            out[task] = float(results[task][metric])
    return out


def _finite(x):
    return isinstance(x, float) and math.isfinite(x)


def _clean(value):
    """NaN -> None (strict JSON), numpy / torch scalars -> float, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


def summarise(config_name, backends):
    """Per task: the headline metric of each backend (None where it did not run or failed) and
    the differences to float32; and the markdown rows."""
    values = {b: headline(r["results"]) for b, r in backends.items() if "results" in r}
    tasks = [t for t in TASKS if any(t in v for v in values.values())]
    summary, rows = {}, []
    for task in tasks:
        entry = {b: values.get(b, {}).get(task) for b in BACKENDS}
        f32 = entry["float32"]
        for b, key in (("bfloat16", "bf16-f32"), ("onnxruntime", "ort-f32")):
            entry[key] = entry[b] - f32 if _finite(entry[b]) and _finite(f32) else None
        summary[task] = entry

        def cell(b):
            if _finite(entry[b]):
                return f"{entry[b]:.2f}"
            run = backends.get(b)
            if run is None:
                return "not run"
            return "nan" if "results" in run else run.get("status", "error")

        def diff(key):
            return f"{entry[key]:+.2f}" if entry[key] is not None else "-"

        rows.append(f"| `{config_name}` | {TASKS[task][0]} | {cell('float32')} | {cell('bfloat16')} | "
                    f"{cell('onnxruntime')} | {diff('bf16-f32')} | {diff('ort-f32')} |")
    return summary, rows


def source_state():
    """The repository's HEAD and the uncommitted changes under projects/ (what the evaluation ran), or
    None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "projects"], cwd=REPO, capture_output=True,
                                 text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"head": head, "uncommitted_in_projects": [line[3:] for line in changed]}


def begin_run(args, weights_required=True):
    """The bench scripts' start: thread count, d2seg registered, Detectron2's and d2seg's logs to
    ``<output>/log.txt``. Returns the d2seg logger, or None (after an error line) if
    ``--weights`` names no file (an empty ``--weights`` is allowed unless ``weights_required``)."""
    torch.set_num_threads(args.threads)
    from detectron2.utils.logger import setup_logger

    import d2seg  # noqa: F401  (registers every method and the built-in data sets)

    os.makedirs(args.output, exist_ok=True)
    setup_logger(output=os.path.join(args.output, "log.txt"), name="d2seg")
    setup_logger(output=os.path.join(args.output, "log.txt"))
    if (args.weights or weights_required) and not os.path.isfile(args.weights):
        print(f"error: --weights {args.weights}: no such file", file=sys.stderr)
        return None
    return logging.getLogger("d2seg")


def main(argv=None):
    args = parse_args(argv)
    logger = begin_run(args)
    if logger is None:
        return 2
    from d2seg.deploy import ExportError, export_onnx, read_metadata
    from d2seg.engine import AtomicCheckpointer, Trainer, setup_cfg

    def cfg_for(backend):
        precision = "bfloat16" if backend == "bfloat16" else "float32"
        return setup_cfg(args.config_file, list(args.opts) + [
            "MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu", "TEST.PRECISION", precision,
            "OUTPUT_DIR", os.path.join(args.output, backend)])

    cfg = cfg_for("float32")
    model = Trainer.build_model(cfg).eval()
    AtomicCheckpointer(model).load(args.weights)
    config_name = os.path.relpath(os.path.abspath(args.config_file), os.path.join(REPO, "configs"))
    if config_name.startswith(".."):
        config_name = args.config_file

    backends = {}
    for backend in args.backends:
        run = backends[backend] = {}
        bcfg = cfg_for(backend)
        start = time.perf_counter()
        try:
            if backend == "onnxruntime":
                path = os.path.join(args.output, "model.onnx")
                try:
                    export_onnx(model, path, bcfg)
                except ValueError as e:
                    if "cannot export a" in str(e):  # graph_for: no graph for this meta-architecture
                        run["status"] = "no graph"
                    else:
                        run["status"] = "export failed"
                    run["error"] = str(e)
                    logger.warning(f"{backend}: {e}")
                    continue
                except ExportError as e:
                    run.update(status="no graph", error=str(e))
                    logger.warning(f"{backend}: {e}")
                    continue
                meta = read_metadata(path)
                run["export"] = ("dynamic" if meta["d2seg.dynamic"] == "1"
                                 else f"fixed {meta['d2seg.height']}x{meta['d2seg.width']}")
                side = int(bcfg.INPUT.MIN_SIZE_TEST)
                run["check"] = _tool("export_model").check_against_pytorch(model, path, bcfg, side, side)
                logger.info(f"onnxruntime: exported {path} ({run['export']}); check: {run['check']}")
                run["results"] = _tool("eval_onnx").evaluate(path, bcfg, num_threads=args.threads)
            else:
                run["results"] = Trainer.test(bcfg, model)
            run["status"] = "ok"
        except RuntimeError as e:  # e.g. bfloat16 on a CPU without native support
            run.update(status="error", error=str(e).splitlines()[0])
            logger.error(f"{backend}: {e}")
        finally:
            run["seconds"] = round(time.perf_counter() - start, 1)

    summary, rows = summarise(config_name, backends)
    report = {
        "config": config_name, "weights": os.path.abspath(args.weights), "opts": list(args.opts),
        "dataset": list(cfg.DATASETS.TEST), "threads": args.threads, "torch": torch.__version__,
        "command": " ".join([os.path.relpath(os.path.abspath(__file__), REPO)] + (argv if argv is not None
                                                                                    else sys.argv[1:])),
        "source": source_state(), "backends": backends, "summary": summary, "markdown": rows,
    }
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(_clean(report), f, indent=1)
    print(json.dumps(_clean(summary), indent=1))
    print(HEADER)
    print("\n".join(rows))
    return 0 if all(r.get("status") in ("ok", "no graph") for r in backends.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
