#!/usr/bin/env python
"""One command for a GPU machine: is the CUDA build of d2seg right, and is it fast?

    python tools/gpu_check.py                      # or: make test-gpu
    python tools/gpu_check.py --out /tmp/gpu_check # writes /tmp/gpu_check.md and .json
    python tools/gpu_check.py --skip-bench         # correctness only

Without CUDA it refuses at once (exit status 2), saying why: torch.cuda.is_available() is
False, or d2seg._C was built without CUDA kernels (rebuild with `FORCE_CUDA=1 make build`).
Otherwise it runs, each stage with its own time limit so that one hung stage cannot eat the
budget (the default run fits in about 8 minutes on one GPU):

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
"""
import argparse
import ast
import datetime
import glob
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TESTS = "tests/test_gpu_ops.py"

# Each stage's own time limit (seconds). Tests and training run side by side.
LIMITS = {"environment": 120, "tests": 300, "prepare_data": 180, "train": 300, "train_config": 240,
          "bench_ops": 150}
BUDGET_S = 480  # the whole run; the model benchmark gets what is left of it
TRAIN_OPTS_GPU = ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "50", "SOLVER.STEPS", "()"]
TRAIN_OPTS_SMOKE = ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2",
                    "SOLVER.STEPS", "()"]  # on CPU: bfloat16 autocast (CPUAutocastTrainer)
BUILD_HINT = "build the CUDA kernels with `FORCE_CUDA=1 make build` on a machine with the CUDA toolkit (nvcc)"

_T0 = time.time()


def log(msg):
    t = int(time.time() - _T0)
    print(f"[gpu_check {t // 60:02d}:{t % 60:02d}] {msg}", flush=True)


def rel(path):
    """A path relative to the repository root when it lies inside it."""
    if os.path.isabs(path) and os.path.commonpath([path, REPO]) == REPO:
        return os.path.relpath(path, REPO)
    return path


# ---------------------------------------------------------------------------- processes


class Job:
    """A subprocess in its own session (so a timeout ends it and all its children), output
    to a log file, with a deadline."""

    def __init__(self, name, cmd, log_path, timeout, env=None):
        self.name, self.cmd, self.log_path, self.timeout = name, cmd, log_path, timeout
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self._log = open(log_path, "w")
        self._log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n\n")
        self._log.flush()
        self.start = time.time()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.rc, self.timed_out, self.wall_s = None, False, None

    def poll(self):
        """Finished (or just killed for its deadline)?"""
        if self.rc is not None:
            return True
        rc = self.proc.poll()
        if rc is None and time.time() - self.start > self.timeout:
            self.kill()
            self.timed_out = True
            rc = self.proc.wait()
        if rc is None:
            return False
        self.rc, self.wall_s = rc, time.time() - self.start
        self._log.close()
        return True

    def kill(self):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue

    def wait(self):
        while not self.poll():
            time.sleep(0.5)
        return self

    def result(self):
        return {"command": " ".join(shlex.quote(c) for c in self.cmd), "rc": self.rc, "timed_out": self.timed_out,
                "wall_s": round(self.wall_s or 0.0, 1), "log": rel(self.log_path)}


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def child_env(threads, **extra):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ---------------------------------------------------------------------------- preflight


def load_extension_only():
    """(d2seg._C, None) or (None, why), without importing the d2seg package (Detectron2 and
    every method: seconds), so that a refusal comes at once. The module is registered as
    d2seg._C, so a later `import d2seg` uses it."""
    import importlib.machinery
    import importlib.util

    if "d2seg._C" in sys.modules:
        return sys.modules["d2seg._C"], None
    if os.environ.get("D2SEG_DISABLE_EXTENSION") == "1":
        return None, "disabled by D2SEG_DISABLE_EXTENSION=1"
    spec = importlib.util.find_spec("d2seg")
    if spec is None or not spec.submodule_search_locations:
        return None, "the d2seg package is not installed (run `make install`)"
    found = [p for folder in spec.submodule_search_locations
             for suffix in importlib.machinery.EXTENSION_SUFFIXES
             for p in glob.glob(os.path.join(folder, "_C" + suffix))]
    if not found:
        return None, f"no compiled d2seg._C in {list(spec.submodule_search_locations)}"
    import torch  # noqa: F401  (the extension links against torch's libraries)

    try:
        loader = importlib.machinery.ExtensionFileLoader("d2seg._C", found[0])
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("d2seg._C", found[0], loader=loader))
        loader.exec_module(module)
    except ImportError as e:
        return None, str(e)
    sys.modules["d2seg._C"] = module
    return module, None


def preflight():
    """Facts about CUDA and d2seg._C, and the reasons (if any) not to run on a GPU."""
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "ext": None, "ext_has_cuda": False}
    reasons = []
    if not info["cuda_available"]:
        built = f"torch {torch.__version__} built with CUDA {torch.version.cuda}" if torch.version.cuda \
            else f"torch {torch.__version__} is a CPU-only build"
        reasons.append(f"torch.cuda.is_available() is False: PyTorch sees no GPU ({built}); run this on a "
                       f"machine with an NVIDIA GPU and its driver")
    try:
        ext, error = load_extension_only()
        if ext is None:
            reasons.append(f"d2seg._C cannot be imported ({error}); {BUILD_HINT}")
        else:
            info["ext"] = f"built for torch {ext.torch_version}"
            info["ext_has_cuda"] = bool(ext.has_cuda())
            if not info["ext_has_cuda"]:
                reasons.append(f"d2seg._C.has_cuda() is False: d2seg was built without its CUDA kernels; {BUILD_HINT}")
    except Exception as e:  # noqa: BLE001  (anything else: say it, and refuse)
        reasons.append(f"d2seg._C could not be loaded ({type(e).__name__}: {e}); {BUILD_HINT}")
    if info["cuda_available"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["reasons"] = reasons
    return info


# ---------------------------------------------------------------------------- environment


def stage_environment(work):
    t0 = time.time()
    out = {"status": "pass"}
    job = Job("collect_env", [sys.executable, "-m", "d2seg.collect_env"], os.path.join(work, "collect_env.log"),
              LIMITS["environment"], env=child_env(1)).wait()
    with open(job.log_path, errors="replace") as f:
        text = f.read().split("\n", 2)[-1].strip()
    out["collect_env"] = "\n".join(l for l in text.splitlines() if "Warning" not in l and "warnings.warn" not in l)
    if job.rc != 0:
        out["status"] = "fail"
        out["error"] = f"collect_env exited with {job.rc}" + (" (time limit)" if job.timed_out else "")
    try:
        out["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["nvidia_smi"] = "(nvidia-smi not found)"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        out["git"] = {"commit": commit or "?", "modified_files": len(dirty.splitlines()) if dirty else 0}
    except (OSError, subprocess.SubprocessError):
        out["git"] = {"commit": "?", "modified_files": None}
    out["wall_s"] = round(time.time() - t0, 1)
    return out


# ---------------------------------------------------------------------------- tests


def cuda_only_tests(exclude=GPU_TESTS):
    """Node ids of the suite's tests marked skipif(not torch.cuda.is_available()) (a module
    with such a pytestmark counts whole)."""
    ids = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        name = rel(path)
        if name == exclude:
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)

        def marked(node):
            return any("cuda.is_available" in ast.unparse(d) for d in getattr(node, "decorator_list", []))

        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                if "cuda.is_available" in ast.unparse(node.value):
                    ids.append(name)
                    break
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test") and marked(node):
                ids.append(f"{name}::{node.name}")
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef) and sub.name.startswith("test") and (marked(sub) or marked(node)):
                        ids.append(f"{name}::{node.name}::{sub.name}")
    return sorted(set(ids))


def parse_junit(path):
    """Counts, failures (with their first message line), skip reasons and the slowest tests."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skipped, times = [], {}, []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        node = (case.get("classname", "") + "::" + case.get("name", "")).strip(":")
        times.append((float(case.get("time", 0) or 0), node))
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            kind = "failure" if "failure" in kinds else "error"
            counts["failed" if kind == "failure" else "errors"] += 1
            el = kinds[kind]
            msg = (el.get("message") or "").strip()
            if msg in ("", "collection failure"):  # pytest's generic text: the reason is in the body
                lines = [l.strip() for l in (el.text or "").splitlines() if l.strip()]
                msg = (lines[-1] if lines else "") or msg or kind
            failures.append({"test": node, "kind": kind, "message": msg.splitlines()[0][:300]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "").strip()[:200]
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    times.sort(reverse=True)
    return {"counts": counts, "failures": failures,
            "skipped": [{"reason": r, "count": c} for r, c in sorted(skipped.items())],
            "slowest": [{"test": n, "s": round(t, 2)} for t, n in times[:5]]}


def start_tests(work, smoke):
    others = cuda_only_tests()
    cmd = [sys.executable, "-m", "pytest", GPU_TESTS] + others + [
        "-q", "-p", "no:cacheprovider", "--junitxml", os.path.join(work, "pytest.xml")]
    env = child_env(4, D2SEG_REQUIRE_CUDA=1)
    if smoke:  # the CPU as device, a few of the tests; the CUDA-only ones skip
        env = child_env(1, D2SEG_GPU_TESTS_DEVICE="cpu")
        env.pop("D2SEG_REQUIRE_CUDA", None)
        cmd += ["-k", "gradcheck or cuda_matches_cpu"]
    log(f"tests: {GPU_TESTS} + {len(others)} CUDA-only test(s) of the suite ({', '.join(others)}) ...")
    xml = os.path.join(work, "pytest.xml")
    if os.path.exists(xml):
        os.remove(xml)
    return Job("tests", cmd, os.path.join(work, "pytest.log"), LIMITS["tests"], env=env)


def finish_tests(job, smoke):
    job.wait()
    out = job.result()
    xml = os.path.join(os.path.dirname(job.log_path), "pytest.xml")
    if os.path.isfile(xml):
        out.update(parse_junit(xml))
    else:
        out.update(counts=None, failures=[], skipped=[], slowest=[])
    c = out["counts"]
    problems = []
    if job.timed_out:
        problems.append(f"time limit of {job.timeout} s reached")
    if c is None:
        problems.append(f"no test results (pytest exit status {job.rc}); see {out['log']}")
    else:
        if c["failed"] or c["errors"]:
            problems.append(f"{c['failed']} failed, {c['errors']} errors")
        if c["passed"] == 0:
            problems.append("no test passed")
        if c["skipped"] and not smoke:
            problems.append(f"{c['skipped']} skipped on a GPU machine")
        if job.rc not in (0,) and not problems:
            problems.append(f"pytest exit status {job.rc}")
    out["status"] = "fail" if problems else "pass"
    out["problems"] = problems
    if c:
        log(f"tests: {out['status'].upper()} - {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
            f"{c['skipped']} skipped in {out['wall_s']:.0f} s" + (f" ({'; '.join(problems)})" if problems else ""))
    else:
        log(f"tests: FAIL - {'; '.join(problems)}")
    if problems:
        out["log_tail"] = tail(job.log_path, 30)
    return out


# ---------------------------------------------------------------------------- training


def shapes_configs():
    from d2seg.benchmark import discover_shapes_configs

    return discover_shapes_configs(REPO)


def _slug(config_file):
    return os.path.splitext(rel(config_file))[0].replace("configs/", "", 1).replace("/", "__")


def read_metrics(path):
    """From a Detectron2 metrics.json (JSON lines): the last training losses, the median
    iteration time, the last evaluation numbers."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
    except OSError:
        return {}
    train = [r for r in rows if "total_loss" in r]
    evals = [r for r in rows if any(k.endswith("/AP") or "mIoU" in k for k in r)]
    out = {}
    if train:
        last = train[-1]
        out["iterations"] = int(last.get("iteration", -1)) + 1
        out["final_losses"] = {k: v for k, v in sorted(last.items()) if k.startswith("loss") or k == "total_loss"}
        times = sorted(r["time"] for r in train if isinstance(r.get("time"), (int, float)))
        if times:
            out["ms_per_iter"] = 1000 * times[len(times) // 2]
    if evals:
        last = evals[-1]
        for key, name in (("bbox/AP", "box_AP"), ("segm/AP", "mask_AP"), ("sem_seg/mIoU", "mIoU")):
            if key in last:
                out[name] = last[key]
    return out


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def prepare_data(work, configs, opts):
    """Generate the built-in data sets of every config once, before the parallel runs."""
    code = ("import sys\nfrom d2seg.engine import setup_cfg\nfrom d2seg.data.builtin import prepare_datasets\n"
            "opts = sys.argv[2:]\nfor c in sys.argv[1].split(','):\n    prepare_datasets(setup_cfg(c, opts))\n")
    job = Job("prepare_data", [sys.executable, "-c", code, ",".join(configs)] + list(opts),
              os.path.join(work, "prepare_data.log"), LIMITS["prepare_data"], env=child_env(2)).wait()
    return job.result()


def stage_train(work, configs, opts, jobs, smoke, max_iter):
    t0 = time.time()
    out = {"configs": [], "jobs": jobs}
    log(f"train: generating the data sets of {len(configs)} config(s) ...")
    out["prepare_data"] = prep = prepare_data(work, configs, opts)
    if prep["rc"] != 0:
        log(f"train: data preparation failed (exit {prep['rc']}); each run will try itself; see {prep['log']}")
    base = list(TRAIN_OPTS_SMOKE if smoke else TRAIN_OPTS_GPU)
    base[base.index("SOLVER.MAX_ITER") + 1] = str(max_iter)
    out["overrides"] = base + list(opts)
    pending = list(configs)
    running = []
    results = {}
    stage_end = time.time() + LIMITS["train"]
    log(f"train: {len(configs)} config(s), {max_iter} iterations each, {jobs} at a time ...")
    while pending or running:
        while pending and len(running) < jobs and time.time() < stage_end:
            cfg = pending.pop(0)
            run_dir = os.path.join(work, "train", _slug(cfg))
            if os.path.isdir(run_dir):
                for name in ("metrics.json", "last_checkpoint"):
                    if os.path.exists(os.path.join(run_dir, name)):
                        os.remove(os.path.join(run_dir, name))
            cmd = [sys.executable, "tools/train_net.py", "--config-file", cfg] + base + list(opts) + ["OUTPUT_DIR", run_dir]
            timeout = max(10, min(LIMITS["train_config"], stage_end - time.time()))
            running.append((cfg, run_dir, Job(cfg, cmd, os.path.join(run_dir, "train.log"), timeout, env=child_env(2))))
        if not running and pending:  # stage time spent before these could start
            for cfg in pending:
                results[cfg] = {"config": rel(cfg), "status": "fail", "problems": ["not started: train stage time limit"]}
                log(f"train: {rel(cfg)}: not started (stage time limit)")
            pending = []
        for item in list(running):
            cfg, run_dir, job = item
            if not job.poll():
                continue
            running.remove(item)
            r = {"config": rel(cfg), **job.result(), **read_metrics(os.path.join(run_dir, "metrics.json"))}
            problems = []
            if job.timed_out:
                problems.append(f"time limit of {job.timeout:.0f} s reached")
            if job.rc != 0:
                problems.append(f"exit status {job.rc}")
            losses = r.get("final_losses")
            r["losses_finite"] = bool(losses) and all(_finite(v) for v in losses.values())
            if not losses:
                problems.append("no training losses in metrics.json")
            elif not r["losses_finite"]:
                problems.append("non-finite final loss")
            if r.get("iterations", 0) < max_iter:
                problems.append(f"reached iteration {r.get('iterations', 0)} of {max_iter}")
            if not any(k in r for k in ("box_AP", "mask_AP", "mIoU")):
                problems.append("no evaluation result in metrics.json")
            if problems:
                r["log_tail"] = tail(job.log_path, 12)
            r["status"] = "fail" if problems else "pass"
            r["problems"] = problems
            results[cfg] = r
            log(f"train [{len(results)}/{len(configs)}] {rel(cfg)}: {r['status'].upper()} in {r['wall_s']:.0f} s"
                + (f", loss {losses.get('total_loss'):.3f}" if losses and _finite(losses.get("total_loss")) else "")
                + "".join(f", {k} {_fmt(r[k])}" for k in ("box_AP", "mask_AP", "mIoU") if k in r)
                + (f" ({'; '.join(problems)})" if problems else ""))
        time.sleep(0.5)
    out["configs"] = [results[c] for c in configs]
    failed = [r["config"] for r in out["configs"] if r["status"] != "pass"]
    out["status"] = "fail" if failed or not configs else "pass"
    out["failed"] = failed
    out["wall_s"] = round(time.time() - t0, 1)
    return out


# ---------------------------------------------------------------------------- benchmarks


def stage_bench_ops(work, smoke):
    json_path = os.path.join(work, "benchmark_ops.json")
    if os.path.exists(json_path):
        os.remove(json_path)
    if smoke:
        cmd = [sys.executable, "dev/bench/benchmark_ops.py", "--device", "cpu", "--threads", "1", "--repeat", "1",
               "--only", "d=1", "--json", json_path]
    else:
        cmd = [sys.executable, "dev/bench/benchmark_ops.py", "--device", "cuda", "--repeat", "10",
               "--dtype", "float32,float16", "--json", json_path]
    log("bench_ops: " + " ".join(cmd[1:]) + " ...")
    job = Job("bench_ops", cmd, os.path.join(work, "benchmark_ops.log"), LIMITS["bench_ops"], env=child_env(2)).wait()
    out = job.result()
    out["rows"] = []
    if os.path.isfile(json_path):
        with open(json_path) as f:
            data = json.load(f)
        out["rows"], out["setup"] = data["rows"], data.get("setup")
    problems = []
    if job.timed_out:
        problems.append(f"time limit of {job.timeout} s reached")
    if job.rc != 0:
        problems.append(f"exit status {job.rc}")
    if not out["rows"]:
        problems.append("no rows measured")
    out["slower_than_composite"] = [f"{r['op']} {r['mode']} ({r['dtype']}): {r['speedup']:.2f}x"
                                    for r in out["rows"] if r.get("speedup", 1.0) < 1.0]  # rows without one were skipped
    out["status"] = "fail" if problems else "pass"
    out["problems"] = problems
    if problems:
        out["log_tail"] = tail(job.log_path, 15)
    log(f"bench_ops: {out['status'].upper()} - {len(out['rows'])} rows in {out['wall_s']:.0f} s"
        + (f"; slower than the composite: {len(out['slower_than_composite'])}" if out["slower_than_composite"] else "")
        + (f" ({'; '.join(problems)})" if problems else ""))
    return out


def stage_bench(work, smoke, configs, opts, time_left):
    folder = os.path.join(work, "benchmark")
    for name in ("benchmark.json", "benchmark.md"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    # benchmark.py starts no phase after `budget` s (all inference first, then training);
    # its own limit adds the longest a last phase may take (--timeout)
    per_phase = 60 if smoke else 120
    budget = max(0.0, time_left - 40)
    cmd = [sys.executable, "tools/benchmark.py", "--device", "cpu" if smoke else "cuda", "--output", folder,
           "--timeout", str(per_phase), "--time-budget", f"{budget:.0f}"]
    if smoke:
        cmd += ["--warmup", "0", "--repeats", "1", "--no-train"]
    else:
        cmd += ["--all-detections", "--warmup", "3", "--repeats", "20", "--train-warmup", "2", "--train-iters", "5"]
    for c in configs or []:
        cmd += ["--config-file", c]
    cmd += list(opts)
    log(f"bench: tools/benchmark.py over {len(configs) if configs else 'every'} config(s), "
        f"starting none after {budget:.0f} s ...")
    job = Job("bench", cmd, os.path.join(work, "benchmark.log"), budget + per_phase + 30,
              env=child_env(1)).wait()
    out = job.result()
    out["rows"], out["not_measured"], out["table"] = [], [], ""
    problems = []
    json_path = os.path.join(folder, "benchmark.json")
    if os.path.isfile(json_path):
        with open(json_path) as f:
            data = json.load(f)
        out["not_measured"] = data.get("not_measured", [])
        for row in data["rows"]:
            entry = {"config": row["config_file"], "method": row["method"]}
            for phase in ("infer", "train"):
                res = row.get(phase)
                if res is None:
                    continue
                if "error" in res:
                    entry[f"{phase}_error"] = res["error"]
                    problems.append(f"{row['config_file']} {phase}: {res['error'][:200]}")
                else:
                    entry[f"{phase}_ms_median"] = res["ms"]["median"]
                    entry[f"{phase}_peak_mib"] = res.get("peak_mib")
                    if phase == "infer":
                        entry["detections"] = res.get("detections")
            entry["ratio_infer"], entry["ratio_train"] = row.get("ratio_infer"), row.get("ratio_train")
            out["rows"].append(entry)
        with open(os.path.join(folder, "benchmark.md")) as f:
            out["table"] = f.read()
        out["chart"] = rel(os.path.join(folder, "benchmark.png")) if os.path.isfile(os.path.join(folder, "benchmark.png")) else None
    else:
        problems.append(f"no benchmark.json (exit status {job.rc}); see {out['log']}")
    if job.timed_out:
        problems.append(f"time limit of {job.timeout:.0f} s reached")
    elif job.rc not in (0, 1):
        problems.append(f"exit status {job.rc}")
    out["status"] = "fail" if problems else "pass"
    out["problems"] = problems
    if problems:
        out["log_tail"] = tail(job.log_path, 15)
    log(f"bench: {out['status'].upper()} - {len(out['rows'])} config(s) measured in {out['wall_s']:.0f} s"
        + (f", {len(out['not_measured'])} not reached in time" if out["not_measured"] else "")
        + (f" ({'; '.join(problems)})" if problems else ""))
    return out


# ---------------------------------------------------------------------------- report


def _fmt(x, digits=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        return f"{x:.{digits}f}"
    return str(x)


STAGE_TITLES = {"environment": "Environment", "tests": "GPU op tests", "train": "Training on CUDA",
                "bench_ops": "Op benchmark", "bench": "Model benchmark"}


def _log_tail(section):
    if not section.get("log_tail"):
        return []
    return ["", f"End of `{section.get('log', 'the log')}`:", "", "```", section["log_tail"].rstrip(), "```"]


def markdown(report):
    s = report["sections"]
    smoke = report["mode"] == "cpu-smoke"
    L = ["# d2seg GPU check" + (" — CPU SMOKE RUN (plumbing only, says nothing about CUDA)" if smoke else ""), ""]
    L.append(f"**Verdict: {report['verdict'].upper()}**"
             + (f" — failed: {', '.join(report['failed_sections'])}" if report["failed_sections"] else ""))
    L.append("")
    for w in report["warnings"]:
        L.append(f"- warning: {w}")
    if report["warnings"]:
        L.append("")
    git = s.get("environment", {}).get("git", {})
    L += [f"- Command: `{report['command']}` (from the repository root)",
          f"- Started {report['started_utc']} UTC; wall time {report['wall_s'] / 60:.1f} min",
          f"- Commit: `{git.get('commit', '?')}`" + (f" with {git['modified_files']} modified tracked file(s)"
                                                     if git.get("modified_files") else ""),
          "", "| stage | status | time s | summary |", "|---|---|---|---|"]
    for key, title in STAGE_TITLES.items():
        sec = s.get(key)
        if sec:
            L.append(f"| {title} | {sec['status']} | {_fmt(sec.get('wall_s'), 0)} | {sec.get('summary', '')} |")
    L.append("")

    env = s.get("environment")
    if env and env["status"] != "skipped":
        L += ["## Environment", "", "```", env.get("collect_env", ""), "```", ""]
        if env.get("nvidia_smi"):
            L += ["<details><summary>nvidia-smi</summary>", "", "```", env["nvidia_smi"], "```", "", "</details>", ""]

    t = s.get("tests")
    if t:
        L += ["## GPU op tests", "", f"Status: **{t['status']}**."]
        if t["status"] != "skipped":
            c = t.get("counts") or {}
            L += [f"`{t['command']}` (log `{t['log']}`)", "",
                  f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
                  f"{c.get('skipped', 0)} skipped of {c.get('tests', 0)}, in {t['wall_s']:.0f} s."]
            for p in t.get("problems", []):
                L.append(f"- problem: {p}")
            if t.get("failures"):
                L += ["", "Failures (first 30):", ""]
                L += [f"- `{f['test']}`: {f['message']}" for f in t["failures"][:30]]
            if t.get("skipped"):
                L += ["", "Skipped:", ""] + [f"- {x['count']} x {x['reason']}" for x in t["skipped"]]
            L += _log_tail(t)
        L.append("")

    tr = s.get("train")
    if tr:
        L += ["## Training on CUDA" if not smoke else "## Training (CPU smoke)", "", f"Status: **{tr['status']}**."]
        if tr["status"] != "skipped":
            L += [f"Overrides: `{' '.join(tr.get('overrides', []))}`; {tr.get('jobs')} runs at a time; "
                  "each run is evaluated on its DATASETS.TEST at the end. After so few iterations from scratch "
                  "the AP / mIoU only shows that inference and evaluation ran (NaN: no detections). ms/iter "
                  "(Detectron2's median iteration time) is with the other runs and the tests sharing the device.", "",
                  "| config | status | exit | iterations | final total_loss | losses finite | box AP | mask AP | mIoU "
                  "| ms/iter | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in tr["configs"]:
                L.append(f"| `{r['config']}` | {r['status']} | {_fmt(r.get('rc'))} | {_fmt(r.get('iterations'))} "
                         f"| {_fmt((r.get('final_losses') or {}).get('total_loss'), 3)} | {_fmt(r.get('losses_finite'))} "
                         f"| {_fmt(r.get('box_AP'))} | {_fmt(r.get('mask_AP'))} | {_fmt(r.get('mIoU'))} "
                         f"| {_fmt(r.get('ms_per_iter'), 0)} | {_fmt(r.get('wall_s'), 0)} |")
            for r in tr["configs"]:
                if r.get("problems"):
                    L += ["", f"`{r['config']}`: {'; '.join(r['problems'])}" + (f" (log `{r['log']}`)" if r.get("log") else "")]
                    if r.get("log_tail"):
                        L += ["```", r["log_tail"].rstrip(), "```"]
        L.append("")

    b = s.get("bench_ops")
    if b:
        L += ["## Op benchmark", "", f"Status: **{b['status']}**."]
        if b["status"] != "skipped":
            L += [f"`{b['command']}`" + (f" — {b['setup']}" if b.get("setup") else ""), ""]
            if b["rows"]:
                L += ["Speed-up = composite / compiled (> 1: the compiled op is faster); memory ratio = compiled "
                      "peak / composite peak.", "",
                      "| op | dtype | pass | compiled ms | composite ms | speed-up | peak MiB compiled / composite "
                      "| memory ratio |", "|---|---|---|---|---|---|---|---|"]
            for r in b["rows"]:
                L.append(f"| {r['op']} | {r['dtype']} | {r['mode']} | {r['compiled_ms']:.2f} | {r['composite_ms']:.2f} "
                         f"| {r['speedup']:.2f}x | {r['compiled_peak_mib']:.1f} / {r['composite_peak_mib']:.1f} "
                         f"| {r['memory_ratio']:.3f} |")
            if b.get("slower_than_composite"):
                L += ["", "Slower than the composite: " + "; ".join(b["slower_than_composite"])]
            for p in b.get("problems", []):
                L.append(f"- problem: {p}")
            L += _log_tail(b)
        L.append("")

    m = s.get("bench")
    if m:
        L += ["## Model benchmark", "", f"Status: **{m['status']}**."]
        if m["status"] not in ("skipped", "not run"):
            L += [f"`{m['command']}` (log `{m['log']}`" + (f", chart `{m['chart']}`" if m.get("chart") else "") + ")", ""]
            table = "\n".join(l for l in m.get("table", "").splitlines() if not l.startswith("![")
                              and not l.startswith("# "))
            L.append(table.strip())
            for p in m.get("problems", []):
                L.append(f"- problem: {p}")
            L += _log_tail(m)
        L.append("")
    return "\n".join(L).rstrip() + "\n"


def summarize(sections):
    t = sections.get("tests")
    if t and t["status"] != "skipped":
        c = t.get("counts") or {}
        t["summary"] = (f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
                        f"{c.get('skipped', 0)} skipped")
    tr = sections.get("train")
    if tr and tr["status"] != "skipped":
        ok = sum(r["status"] == "pass" for r in tr["configs"])
        tr["summary"] = f"{ok} of {len(tr['configs'])} configs trained and evaluated, {tr['jobs']} at a time"
    b = sections.get("bench_ops")
    if b and b["status"] != "skipped":
        sp = [r["speedup"] for r in b["rows"]]
        b["summary"] = (f"{len(sp)} rows, speed-up {min(sp):.2f}x–{max(sp):.2f}x" if sp else "no rows") + (
            f", {len(b['slower_than_composite'])} slower than the composite" if b.get("slower_than_composite") else "")
    m = sections.get("bench")
    if m and m["status"] not in ("skipped", "not run"):
        m["summary"] = f"{len(m['rows'])} configs measured" + (
            f", {len(m['not_measured'])} not reached in time" if m.get("not_measured") else "")
    e = sections.get("environment")
    if e and e["status"] != "skipped":
        e["summary"] = "collect_env, nvidia-smi, git commit"


def _strict_json(x):
    """NaN / infinity as the strings "NaN" / "Infinity" / "-Infinity" (strict JSON has no such numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    return x


def write_report(prefix, report):
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(_strict_json(report), f, indent=1, default=str, allow_nan=False)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(report))


def judge(sections):
    """(verdict, failed sections, warnings): "fail" if any section failed. Skipped or
    not-run sections, compiled ops slower than their composites and configs the model
    benchmark did not reach are warnings."""
    failed = [k for k, v in sections.items() if v["status"] == "fail"]
    warnings = []
    for k, v in sections.items():
        if v["status"] == "skipped":
            warnings.append(f"{STAGE_TITLES.get(k, k)} skipped (by a --skip switch)")
        elif v["status"] == "not run":
            warnings.append(f"{STAGE_TITLES.get(k, k)} not run: the time budget was spent")
    for row in sections.get("bench_ops", {}).get("slower_than_composite", []):
        warnings.append(f"compiled op slower than its composite: {row}")
    if sections.get("bench", {}).get("not_measured"):
        warnings.append(f"model benchmark: {len(sections['bench']['not_measured'])} run(s) not reached in time")
    return ("fail" if failed else "pass"), failed, warnings


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
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
                   help=f"seconds for the whole run; the model benchmark gets what is left (default {BUDGET_S})")
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
    args = parse_args(argv)
    smoke = args.allow_cpu_smoke
    deadline = _T0 + args.budget_s
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
    sections["environment"] = stage_environment(work)

    configs = args.config_file or shapes_configs()
    tests_job = None if args.skip_tests else start_tests(work, smoke)
    if args.skip_train:
        sections["train"] = {"status": "skipped"}
    else:
        jobs = args.jobs or max(1, min(8, (os.cpu_count() or 2) // 2, len(configs)))
        sections["train"] = stage_train(work, configs, args.opts, jobs, smoke, 2 if smoke else 50)
    sections["tests"] = {"status": "skipped"} if tests_job is None else finish_tests(tests_job, smoke)

    if args.skip_bench:
        sections["bench_ops"] = {"status": "skipped"}
        sections["bench"] = {"status": "skipped"}
    else:
        sections["bench_ops"] = stage_bench_ops(work, smoke)
        left = deadline - time.time()
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
        "wall_s": round(time.time() - _T0, 1),
        "work_dir": rel(work),
        "sections": sections,
    }
    write_report(args.out, report)
    log(f"verdict: {report['verdict'].upper()}" + (f" (failed: {', '.join(failed)})" if failed else "")
        + f"; report: {rel(args.out)}.md, {rel(args.out)}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
