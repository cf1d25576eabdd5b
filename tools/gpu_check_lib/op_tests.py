"""The op checks and gradcheck: `D2SEG_REQUIRE_CUDA=1 pytest tests/test_gpu_ops.py` (every
CUDA kernel against the CPU kernel and the composite, float32/16/bfloat16, gradcheck in
float64) plus every test of the suite marked skipif(not torch.cuda.is_available()), read
back from pytest's JUnit XML. On a GPU machine nothing may fail or be skipped."""
import ast
import glob
import os
import sys
import xml.etree.ElementTree as ET

from .process import REPO, Job, child_env, conclude, log, rel

GPU_TESTS = "tests/test_gpu_ops.py"
LIMIT_S = 300


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


def start_tests(work, smoke, budget):
    """Start pytest in the background (it runs beside the training stage)."""
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
    return Job("tests", cmd, os.path.join(work, "pytest.log"), budget.limit(LIMIT_S), env=env)


def finish_tests(job, smoke):
    """Wait for pytest and judge its results."""
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
        problems.append(f"time limit of {job.timeout:.0f} s reached")
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
    conclude(out, problems, job, 30)
    if c:
        log(f"tests: {out['status'].upper()} - {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
            f"{c['skipped']} skipped in {out['wall_s']:.0f} s" + (f" ({'; '.join(problems)})" if problems else ""))
    else:
        log(f"tests: FAIL - {'; '.join(problems)}")
    return out
