#!/usr/bin/env python
"""One command for a GPU machine: is the CUDA build of d2seg right, and is it fast?

    python tools/gpu_check.py                      # or: make test-gpu
    python tools/gpu_check.py --out /tmp/gpu_check # writes /tmp/gpu_check.md and .json
    python tools/gpu_check.py --skip-bench         # correctness only

Without CUDA it refuses at once (exit status 2), saying why: torch.cuda.is_available() is
False, or d2seg._C was built without CUDA kernels (rebuild with `FORCE_CUDA=1 make build`).
Otherwise it runs the stages below (one module each in tools/gpu_check_lib/), each with its
own time limit, cut to what is left of the whole run's budget (--budget-s, default 480 s),
so that one hung stage cannot eat the budget and the run ends in time:

  environment  `python -m d2seg.collect_env`, nvidia-smi, the git commit;
  tests        `D2SEG_REQUIRE_CUDA=1 python -m pytest tests/test_gpu_ops.py` plus every test
               of the suite marked skipif(not torch.cuda.is_available()) (found by reading
               tests/test_*.py); nothing may fail or be skipped;
  train        every configs/**/*shapes*.yaml for 50 iterations on CUDA with AMP
               (`tools/train_net.py ... SOLVER.AMP.ENABLED True MODEL.DEVICE cuda
               SOLVER.MAX_ITER 50 SOLVER.STEPS "()"`), several processes at once, each
               evaluated at the end: exit status, final losses finite, time, box / mask AP or
               mIoU (50 iterations from scratch: the AP only shows that evaluation ran);
               runs at the same time as the tests (neither is timed);
  bench_ops    `dev/bench/benchmark_ops.py --device cuda` in float32 and float16: compiled op
               against the PyTorch composite (a row slower than the composite is a warning);
  bench        `tools/benchmark.py --device cuda` over every shapes config, with the time
               that is left (every config's inference first, then the training runs; what
               it could not reach is listed, not failed).

It writes one report, Markdown and JSON (default docs/gpu_check.md and docs/gpu_check.json;
`--out PREFIX`), with the environment, each stage's status and numbers, and the verdict;
logs and run outputs go under --work-dir (default output/gpu_check). Exit status: 0 all
passed, 1 something failed, 2 refused (no CUDA) or bad arguments.

`--allow-cpu-smoke` is for the test suite only (tests/test_gpu_check.py): it runs the same
pipeline on the CPU with a tiny budget (the given configs, 2 iterations, minimal benchmark
repeats, a few of the GPU tests with the CPU as device) to check the plumbing and the
report; its verdict says nothing about CUDA.

On a machine without network and with its own PyTorch (a lent GPU machine, an air-gapped
cluster), tools/gpu_offline.sh (`make test-gpu-offline`) installs what d2seg needs from the
bundle of tools/gpu_bundle.py, builds d2seg._C there and runs this; see docs/gpu.md.
"""
import argparse
import datetime
import os
import shlex
import sys
import time

from gpu_check_lib import process
from gpu_check_lib.benchmarks import stage_bench, stage_bench_ops
from gpu_check_lib.environment import stage_environment
from gpu_check_lib.op_tests import finish_tests, start_tests
from gpu_check_lib.preflight import preflight
from gpu_check_lib.process import REPO, Budget, log, rel
from gpu_check_lib.report import judge, summarize, write_report
from gpu_check_lib.training import shapes_configs, stage_train

BUDGET_S = 480  # the whole run; each stage's limit is cut to what is left, the model benchmark gets the rest


def parse_args(argv=None):
    """The command line, checked; --out and --work-dir made absolute."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="report path without extension: PREFIX.md and PREFIX.json (default docs/gpu_check)")
    p.add_argument("--work-dir", default=None, help="logs and run outputs (default output/gpu_check)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests")
    p.add_argument("--skip-train", action="store_true", help="do not train the shapes configs")
    p.add_argument("--skip-bench", action="store_true", help="run neither benchmark")
    p.add_argument("--config-file", action="append", default=None, metavar="FILE",
                   help="train (and benchmark) only this config; repeat for several (default: every "
                        "configs/**/*shapes*.yaml)")
    p.add_argument("--jobs", type=int, default=None,
                   help="training runs at a time (default: min(8, CPU cores / 2, number of configs))")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"seconds for the whole run: every stage's limit is cut to what is left, and the model "
                        f"benchmark gets the rest (default {BUDGET_S})")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="extra config overrides for every training and model-benchmark run")
    p.add_argument("--allow-cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # tests/test_gpu_check.py only
    args = p.parse_args(argv)
    if len(args.opts) % 2:
        p.error(f"--opts must be KEY VALUE pairs, got {args.opts}")
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be >= 1")
    for c in args.config_file or []:
        if not os.path.isfile(os.path.join(REPO, c)):
            p.error(f"--config-file: not found: {c}")
    smoke = args.allow_cpu_smoke
    if args.out is None:
        args.out = os.path.join(REPO, "output", "gpu_check_smoke", "gpu_check") if smoke else os.path.join(REPO, "docs", "gpu_check")
    args.out = os.path.abspath(args.out)
    if args.out.endswith((".md", ".json")):
        args.out = os.path.splitext(args.out)[0]
    if args.work_dir is None:
        args.work_dir = os.path.join(REPO, "output", "gpu_check_smoke" if smoke else "gpu_check")
    args.work_dir = os.path.abspath(args.work_dir)
    return args


def main(argv=None):
    """Preflight (refuse without CUDA), then the stages in order; the report; the exit status."""
    args = parse_args(argv)
    smoke = args.allow_cpu_smoke
    budget = Budget(args.budget_s, start=process.START)
    log("checking CUDA and d2seg._C ...")
    pre = preflight()
    if pre["reasons"] and not smoke:
        print("gpu_check: refusing to run, the CUDA build of d2seg cannot be checked here:", file=sys.stderr)
        for r in pre["reasons"]:
            print(f"  - {r}", file=sys.stderr)
        print("Nothing was run and no report was written.", file=sys.stderr)
        return 2
    if smoke:
        log("CPU SMOKE RUN (--allow-cpu-smoke, for the test suite): the pipeline on the CPU with a tiny budget")
    else:
        log(f"CUDA: {', '.join(pre.get('gpus', []))}; d2seg._C has CUDA kernels")
    work = args.work_dir
    os.makedirs(work, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    sections = {"preflight": {"status": "pass", **pre}}

    log("environment ...")
    sections["environment"] = stage_environment(work, budget)

    configs = args.config_file or shapes_configs()
    tests_job = None if args.skip_tests else start_tests(work, smoke, budget)
    if args.skip_train:
        sections["train"] = {"status": "skipped"}
    else:
        jobs = args.jobs or max(1, min(8, (os.cpu_count() or 2) // 2, len(configs)))
        sections["train"] = stage_train(work, configs, args.opts, jobs, smoke, 2 if smoke else 50, budget)
    sections["tests"] = {"status": "skipped"} if tests_job is None else finish_tests(tests_job, smoke)

    if args.skip_bench:
        sections["bench_ops"] = {"status": "skipped"}
        sections["bench"] = {"status": "skipped"}
    else:
        sections["bench_ops"] = stage_bench_ops(work, smoke, budget)
        left = budget.left()
        if left < 90 and not smoke:
            log(f"bench: not run, {left:.0f} s of the {args.budget_s:.0f} s budget left")
            sections["bench"] = {"status": "not run", "problems": [f"not run: {left:.0f} s of the budget left"],
                                 "rows": [], "not_measured": configs, "summary": "not run: no time left"}
        else:
            sections["bench"] = stage_bench(work, smoke, args.config_file, args.opts, max(left, 120 if smoke else 0))

    summarize(sections)
    verdict, failed, warnings = judge(sections)
    report = {
        "tool": "tools/gpu_check.py",
        "mode": "cpu-smoke" if smoke else "gpu",
        "verdict": verdict,
        "failed_sections": failed,
        "warnings": warnings,
        "command": " ".join(shlex.quote(a) for a in ["python", "tools/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
        "started_utc": started,
        "wall_s": round(time.time() - process.START, 1),
        "work_dir": rel(work),
        "sections": sections,
    }
    write_report(args.out, report)
    log(f"verdict: {report['verdict'].upper()}" + (f" (failed: {', '.join(failed)})" if failed else "")
        + f"; report: {rel(args.out)}.md, {rel(args.out)}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
