"""tools/gpu_check.py (`make test-gpu`) without a GPU: it refuses with exit status 2 and the
reason; D2SEG_REQUIRE_CUDA=1 turns the GPU tests' skip into a failure; its CPU smoke mode
(--allow-cpu-smoke, for this suite only) runs the whole pipeline on a tiny budget and writes
the report; and its parts in tools/gpu_check_lib/ (JUnit and metrics parsing, the search for
CUDA-only tests, the verdict, the time budget) on hand-made inputs."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_SHAPES, TOOLS, load_script

GPU_CHECK = os.path.join(TOOLS, "gpu_check.py")


@pytest.fixture(scope="module")
def lib():
    """tools/gpu_check_lib, as tools/gpu_check.py imports it."""
    load_script("tools/gpu_check.py")  # imports the package from tools/, as the script does
    return sys.modules["gpu_check_lib"]


def _no_gpu_env(**extra):
    # hides any GPU, so that these tests mean the same on a GPU machine
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)


def test_refuses_without_cuda_with_exit_status_2_and_the_reason(tmp_path):
    out = subprocess.run([sys.executable, GPU_CHECK, "--out", str(tmp_path / "report")], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=_no_gpu_env())
    assert out.returncode == 2, out.stdout + out.stderr
    assert "refusing to run" in out.stderr
    assert "torch.cuda.is_available() is False" in out.stderr
    assert "FORCE_CUDA=1 make build" in out.stderr or "has_cuda" not in out.stderr
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.json").exists()


def test_require_cuda_makes_the_gpu_tests_fail_instead_of_skipping():
    cmd = [sys.executable, "-m", "pytest", "tests/test_gpu_ops.py", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180,
                         env=_no_gpu_env(D2SEG_REQUIRE_CUDA="1"))
    assert out.returncode != 0
    assert "D2SEG_REQUIRE_CUDA=1 but the CUDA kernels cannot run" in out.stdout
    assert "torch.cuda.is_available() is False" in out.stdout
    assert " passed" not in out.stdout.splitlines()[-1]


def test_cpu_smoke_runs_every_stage_and_writes_the_report(tmp_path):
    prefix = tmp_path / "report"
    cmd = [sys.executable, GPU_CHECK, "--allow-cpu-smoke", "--out", str(prefix), "--work-dir", str(tmp_path / "work"),
           "--config-file", "configs/CondInst/condinst_R18_shapes.yaml", "--opts", *TINY_SHAPES]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=_no_gpu_env())
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    for stage in ("environment", "tests", "train", "bench_ops", "bench", "verdict"):
        assert f"] {stage}" in out.stdout  # progress lines
    report = json.loads((prefix.with_suffix(".json")).read_text())
    md = prefix.with_suffix(".md").read_text()
    assert report["mode"] == "cpu-smoke" and report["verdict"] == "pass" and report["failed_sections"] == []
    s = report["sections"]
    assert set(s) == {"preflight", "environment", "tests", "train", "bench_ops", "bench"}
    assert all(s[k]["status"] == "pass" for k in s), {k: s[k]["status"] for k in s}
    assert "d2seg._C" in s["environment"]["collect_env"] and s["environment"]["git"]["commit"] != "?"
    c = s["tests"]["counts"]
    assert c["passed"] > 0 and c["failed"] == c["errors"] == 0
    assert c["skipped"] == 2  # the two test_cuda_matches_cpu of the suite, found and run
    (run,) = s["train"]["configs"]
    assert run["rc"] == 0 and run["iterations"] == 2 and run["losses_finite"]
    assert set(run["final_losses"]) >= {"total_loss", "loss_mask"}
    assert "box_AP" in run  # the evaluation ran ("NaN": no detections after 2 iterations)
    json.loads(prefix.with_suffix(".json").read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert [r["mode"] for r in s["bench_ops"]["rows"]] == ["forward", "forward+backward"]
    assert all(r["speedup"] > 0 for r in s["bench_ops"]["rows"])
    (row,) = s["bench"]["rows"]
    assert row["method"] == "CondInst" and row["infer_ms_median"] > 0
    assert "CPU SMOKE RUN" in md and "**Verdict: PASS**" in md
    for title in ("## Environment", "## GPU op tests", "## Training", "## Op benchmark", "## Model benchmark"):
        assert title in md
    assert "`configs/CondInst/condinst_R18_shapes.yaml` | pass | 0 | 2 |" in md


def test_parse_junit_counts_failures_skips_and_errors(tmp_path, lib):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="2.0">'
        '<failure message="AssertionError: op output vs the CPU kernel: not close">trace</failure></testcase>'
        '<testcase classname="tests.test_a" name="test_gpu" time="0"><skipped message="no GPU"/></testcase>'
        '<testcase classname="tests.test_a" name="test_gpu2" time="0"><skipped message="no GPU"/></testcase>'
        '<testcase classname="" name="tests.test_b" time="0"><error message="collection failure"/></testcase>'
        "</testsuite></testsuites>")
    r = lib.op_tests.parse_junit(str(xml))
    assert r["counts"] == {"tests": 5, "passed": 1, "failed": 1, "errors": 1, "skipped": 2}
    assert r["failures"][0] == {"test": "tests.test_a::test_bad", "kind": "failure",
                                "message": "AssertionError: op output vs the CPU kernel: not close"}
    assert r["skipped"] == [{"reason": "no GPU", "count": 2}]
    assert r["slowest"][0] == {"test": "tests.test_a::test_bad", "s": 2.0}


def test_read_metrics_takes_the_last_losses_and_evaluation(tmp_path, lib):
    read_metrics, finite = lib.training.read_metrics, lib.training.finite
    path = tmp_path / "metrics.json"
    lines = [
        {"iteration": 19, "total_loss": 3.0, "loss_cls": 2.0, "time": 0.2, "lr": 0.01},
        {"iteration": 49, "total_loss": float("nan"), "loss_cls": 1.0, "time": 0.1},
        {"iteration": 50, "bbox/AP": 12.5, "segm/AP": float("nan")},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    m = read_metrics(str(path))
    assert m["iterations"] == 50 and m["box_AP"] == 12.5 and "mIoU" not in m
    assert set(m["final_losses"]) == {"total_loss", "loss_cls"}
    assert not all(finite(v) for v in m["final_losses"].values())
    assert m["ms_per_iter"] == pytest.approx(200.0)  # the upper median of 0.1 and 0.2 s
    assert read_metrics(str(tmp_path / "missing.json")) == {}


def test_finds_the_suites_cuda_only_tests(lib):
    ids = lib.op_tests.cuda_only_tests()
    assert "tests/test_ops_dynamic_conv.py::test_cuda_matches_cpu" in ids
    assert "tests/test_ops_point_sample.py::test_cuda_matches_cpu" in ids
    assert not any(i.startswith("tests/test_gpu_ops.py") for i in ids)


def test_verdict_fails_on_a_failed_section_and_warns_on_the_rest(lib):
    judge = lib.report.judge
    ok = {"status": "pass"}
    assert judge({"tests": ok, "train": ok}) == ("pass", [], [])
    verdict, failed, warnings = judge({
        "tests": ok, "train": {"status": "fail"}, "bench": {"status": "skipped"},
        "bench_ops": {"status": "pass", "slower_than_composite": ["point_sample forward (float32): 0.80x"]},
    })
    assert verdict == "fail" and failed == ["train"]
    assert any("skipped" in w for w in warnings) and any("0.80x" in w for w in warnings)


def test_budget_cuts_each_stage_limit_to_what_is_left(lib):
    budget = lib.process.Budget(100.0, start=time.time() - 70.0)  # 30 s left
    assert 29.0 < budget.left() <= 30.0
    assert budget.limit(300) == pytest.approx(budget.left(), abs=0.5)  # cut to what is left
    assert budget.limit(20) == 20  # a shorter limit stays
    spent = lib.process.Budget(10.0, start=time.time() - 60.0)
    assert spent.left() < 0 and spent.limit(300) == 10.0  # the floor: a stage still gets to fail cleanly


def test_a_job_past_its_limit_is_killed_with_its_children(tmp_path, lib):
    # a shell that starts a child sleeping for a minute: the kill must take the whole session
    job = lib.process.Job("sleep", ["bash", "-c", "sleep 60 & echo started; wait"], str(tmp_path / "j.log"),
                          timeout=1.0).wait()
    assert job.timed_out and job.rc != 0 and job.wall_s < 20
    r = job.result()
    assert r["timed_out"] and r["log"].endswith("j.log")
    assert "started" in lib.process.tail(job.log_path)
    # what a stage reports of it: both problems, the log's tail, status fail
    problems = lib.process.limit_and_exit_problems(job)
    assert problems == ["time limit of 1 s reached", f"exit status {job.rc}"]
    section = lib.process.conclude({}, problems, job, 5)
    assert section["status"] == "fail" and section["problems"] == problems and "started" in section["log_tail"]


def test_a_clean_job_concludes_as_passed(tmp_path, lib):
    job = lib.process.Job("ok", ["bash", "-c", "echo fine"], str(tmp_path / "ok.log"), timeout=30.0).wait()
    assert lib.process.limit_and_exit_problems(job) == []
    assert lib.process.conclude({"rows": 1}, [], job, 5) == {"rows": 1, "status": "pass", "problems": []}
