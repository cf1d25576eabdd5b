"""The benchmarks: the op benchmark (`dev/bench/benchmark_ops.py --device cuda` in float32
and float16: each compiled op against its PyTorch composite; a row slower than the composite
is a warning) and the model benchmark (`tools/benchmark.py --device cuda` over every shapes
config, inference first, then training steps, with the time that is left; what it could not
reach is listed, not failed)."""
import json
import os
import sys

from .process import Job, child_env, conclude, limit_and_exit_problems, log, rel

BENCH_OPS_LIMIT_S = 150


def stage_bench_ops(work, smoke, budget):
    """Compiled ops against their composites, forward and forward+backward."""
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
    job = Job("bench_ops", cmd, os.path.join(work, "benchmark_ops.log"), budget.limit(BENCH_OPS_LIMIT_S),
              env=child_env(2)).wait()
    out = job.result()
    out["rows"] = []
    if os.path.isfile(json_path):
        with open(json_path) as f:
            data = json.load(f)
        out["rows"], out["setup"] = data["rows"], data.get("setup")
    problems = limit_and_exit_problems(job)
    if not out["rows"]:
        problems.append("no rows measured")
    out["slower_than_composite"] = [f"{r['op']} {r['mode']} ({r['dtype']}): {r['speedup']:.2f}x"
                                    for r in out["rows"] if r.get("speedup", 1.0) < 1.0]  # rows without one were skipped
    conclude(out, problems, job, 15)
    log(f"bench_ops: {out['status'].upper()} - {len(out['rows'])} rows in {out['wall_s']:.0f} s"
        + (f"; slower than the composite: {len(out['slower_than_composite'])}" if out["slower_than_composite"] else "")
        + (f" ({'; '.join(problems)})" if problems else ""))
    return out


def stage_bench(work, smoke, configs, opts, time_left):
    """Inference (then training) speed of every config against its reference, in `time_left` s."""
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
    conclude(out, problems, job, 15)
    log(f"bench: {out['status'].upper()} - {len(out['rows'])} config(s) measured in {out['wall_s']:.0f} s"
        + (f", {len(out['not_measured'])} not reached in time" if out["not_measured"] else "")
        + (f" ({'; '.join(problems)})" if problems else ""))
    return out
