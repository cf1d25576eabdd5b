"""AMP training steps: every shapes config trains on the device with mixed precision
(`tools/train_net.py ... SOLVER.AMP.ENABLED True MODEL.DEVICE cuda SOLVER.MAX_ITER 50`),
several runs at once, each evaluated at the end; its exit status, final losses (finite?),
iteration time and box / mask AP or mIoU are read from Detectron2's metrics.json."""
import json
import math
import os
import sys
import time

from .process import REPO, Job, child_env, conclude, fmt, limit_and_exit_problems, log, rel

LIMITS = {"prepare_data": 180, "train": 300, "train_config": 240}
TRAIN_OPTS_GPU = ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "50", "SOLVER.STEPS", "()"]
TRAIN_OPTS_SMOKE = ["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2",
                    "SOLVER.STEPS", "()"]  # on CPU: bfloat16 autocast (CPUAutocastTrainer)


def shapes_configs():
    """Every configs/**/*shapes*.yaml (the model benchmark's own list)."""
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


def finite(x):
    """A real number that is neither NaN nor infinite?"""
    return isinstance(x, (int, float)) and math.isfinite(x)


def prepare_data(work, configs, opts, budget):
    """Generate the built-in data sets of every config once, before the parallel runs."""
    code = ("import sys\nfrom d2seg.engine import setup_cfg\nfrom d2seg.data.builtin import prepare_datasets\n"
            "opts = sys.argv[2:]\nfor c in sys.argv[1].split(','):\n    prepare_datasets(setup_cfg(c, opts))\n")
    job = Job("prepare_data", [sys.executable, "-c", code, ",".join(configs)] + list(opts),
              os.path.join(work, "prepare_data.log"), budget.limit(LIMITS["prepare_data"]), env=child_env(2)).wait()
    return job.result()


def stage_train(work, configs, opts, jobs, smoke, max_iter, budget):
    """Train every config for `max_iter` iterations, `jobs` runs at a time, within the
    stage's limit and the budget; each run passes if it exits 0 at its last iteration with
    finite losses and an evaluation result."""
    t0 = time.time()
    out = {"configs": [], "jobs": jobs}
    log(f"train: generating the data sets of {len(configs)} config(s) ...")
    out["prepare_data"] = prep = prepare_data(work, configs, opts, budget)
    if prep["rc"] != 0:
        log(f"train: data preparation failed (exit {prep['rc']}); each run will try itself; see {prep['log']}")
    base = list(TRAIN_OPTS_SMOKE if smoke else TRAIN_OPTS_GPU)
    base[base.index("SOLVER.MAX_ITER") + 1] = str(max_iter)
    out["overrides"] = base + list(opts)
    pending = list(configs)
    running = []
    results = {}
    stage_end = time.time() + budget.limit(LIMITS["train"])
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
            problems = limit_and_exit_problems(job)
            losses = r.get("final_losses")
            r["losses_finite"] = bool(losses) and all(finite(v) for v in losses.values())
            if not losses:
                problems.append("no training losses in metrics.json")
            elif not r["losses_finite"]:
                problems.append("non-finite final loss")
            if r.get("iterations", 0) < max_iter:
                problems.append(f"reached iteration {r.get('iterations', 0)} of {max_iter}")
            if not any(k in r for k in ("box_AP", "mask_AP", "mIoU")):
                problems.append("no evaluation result in metrics.json")
            results[cfg] = conclude(r, problems, job, 12)
            log(f"train [{len(results)}/{len(configs)}] {rel(cfg)}: {r['status'].upper()} in {r['wall_s']:.0f} s"
                + (f", loss {losses.get('total_loss'):.3f}" if losses and finite(losses.get("total_loss")) else "")
                + "".join(f", {k} {fmt(r[k])}" for k in ("box_AP", "mask_AP", "mIoU") if k in r)
                + (f" ({'; '.join(problems)})" if problems else ""))
        time.sleep(0.5)
    out["configs"] = [results[c] for c in configs]
    failed = [r["config"] for r in out["configs"] if r["status"] != "pass"]
    out["status"] = "fail" if failed or not configs else "pass"
    out["failed"] = failed
    out["wall_s"] = round(time.time() - t0, 1)
    return out
