"""The environment stage: `python -m d2seg.collect_env`, nvidia-smi and the git commit."""
import os
import subprocess
import sys
import time

from .process import REPO, Job, child_env

LIMIT_S = 120


def stage_environment(work, budget):
    """Versions of everything that matters, the GPUs, and the commit checked."""
    t0 = time.time()
    out = {"status": "pass"}
    job = Job("collect_env", [sys.executable, "-m", "d2seg.collect_env"], os.path.join(work, "collect_env.log"),
              budget.limit(LIMIT_S), env=child_env(1)).wait()
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
