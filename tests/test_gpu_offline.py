"""The offline GPU route rehearsed on the CPU (slow, needs PyPI for the bundles; docs/gpu.md).

1. `tools/gpu_bundle.py build` for CPython 3.12 (the lent GPU machine's): under 60 MiB, with
   Detectron2's Python files, fvcore, iopath and pycocotools, and without PyTorch, numpy or
   the machine's other packages.
2. The same bundle for this machine's Python, and a clean venv standing in for the GPU
   machine's image: its own PyTorch (torch 2.14.1, from the local copy; another pair with
   D2SEG_REHEARSAL_TORCH) and the packages that the bundle's manifest leaves to the machine
   (numpy 2, opencv, scipy, pytest, ...).
3. In a copy of the checkout (what the device tool sends), `tools/gpu_offline.sh` with pip's
   index, config and any proxy turned off: it installs the bundle with `--no-index --target`,
   builds d2seg._C (CPU-only here), and runs tools/gpu_check.py in its CPU smoke mode; the
   report, offline.json and the logs must say every stage passed, with d2seg and Detectron2
   imported from the install folder.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import REPO, TINY_SHAPES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

GPU_PYTHON = "3.12"
# the stand-in machine's PyTorch: make install's pair by default; D2SEG_REHEARSAL_TORCH="torch==2.11.0
# torchvision==0.26.0" rehearses with the lent GPU machine's (a 4 GB download from PyPI)
TORCH = os.environ.get("D2SEG_REHEARSAL_TORCH", "torch==2.14.1 torchvision==0.29.1").split()
LOCAL_PYTHON = "{}.{}".format(*sys.version_info[:2])
TIMES = {}


def _run(cmd, step, **kw):
    t = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    TIMES[step] = round(time.time() - t)
    assert out.returncode == 0, f"{step} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def _python312():
    """A CPython 3.12 interpreter that runs (a pyenv shim of a version not selected does not), or None."""
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for p in [shutil.which("python3.12")] + pyenv:
        if p and subprocess.run([p, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                capture_output=True).returncode == 0:
            return p
    return None


def _build_bundle(out, python_version):
    _run([sys.executable, os.path.join(REPO, "tools", "gpu_bundle.py"), "build", "--out", str(out),
          "--python-version", python_version], f"bundle {python_version}")
    return json.loads((out / "bundle.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_offline")


def test_the_gpu_machines_bundle_fits_and_holds_what_d2seg_needs(work):
    manifest = _build_bundle(work / "bundle312", GPU_PYTHON)
    files = sorted(os.listdir(work / "bundle312"))
    size = sum(os.path.getsize(work / "bundle312" / f) for f in files)
    assert size == manifest["bytes"] + os.path.getsize(work / "bundle312" / "bundle.json")
    assert size < 60 * 2**20, f"{size / 2**20:.1f} MiB"
    names = {w["name"].lower().replace("_", "-") for w in manifest["wheels"]}
    assert {"sal-detectron2", "fvcore", "iopath", "pycocotools", "yacs", "omegaconf", "hydra-core",
            "antlr4-python3-runtime", "termcolor", "setuptools"} <= names
    assert not names & {"torch", "torchvision", "numpy", "scipy", "opencv-python-headless", "pytest", "onnxruntime"}
    # every compiled wheel is for CPython 3.12 on manylinux x86-64; the rest are pure Python
    for f in files:
        if f.endswith(".whl") and not f.endswith("-none-any.whl"):
            assert re.search(r"-cp312-(cp312|abi3)-manylinux\S*x86_64\.whl$", f), f
    assert [w["file"] for w in manifest["wheels"] if w["name"] == "sal-detectron2"] == [
        "sal_detectron2-0.7.2+pyonly-py3-none-any.whl"]
    assert {"torch", "torchvision", "numpy", "opencv-python-headless", "scipy"} <= set(manifest["machine_requirements"])

    # where a CPython 3.12 is at hand (it has no PyTorch here): pip takes every wheel offline
    # (tags, Requires-Python), and what needs nothing of the machine imports, a compiled cp312
    # module (pytokens) and pkg_resources of the bundled setuptools among it
    py312 = _python312()
    if py312 is None:
        return
    site = work / "site312"
    _run([py312, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
          *[str(work / "bundle312" / f) for f in files if f.endswith(".whl")]], "install 3.12",
         env=dict(os.environ, PIP_CONFIG_FILE=os.devnull))
    out = _run([py312, "-c", "import antlr4, termcolor, platformdirs, pkg_resources, pytokens; "
                "import importlib.metadata as m; print(m.version('sal-detectron2'), pytokens.__file__)"], "import 3.12",
               env=dict(os.environ, PYTHONPATH=str(site)))
    version, module = out.stdout.split()
    assert version == "0.7.2+pyonly" and module.startswith(str(site))


def test_offline_rehearsal_installs_builds_and_runs_the_cpu_smoke_check(work):
    bundle_manifest = _build_bundle(work / "repo" / "gpu_bundle", LOCAL_PYTHON)
    # the checkout as the device tool sends it: tracked files and untracked ones git does not ignore
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for f in filter(None, listed):
        if os.path.isfile(os.path.join(REPO, f)):
            os.makedirs(os.path.dirname(work / "repo" / f), exist_ok=True)
            shutil.copy2(os.path.join(REPO, f), work / "repo" / f)

    # the stand-in for the GPU image: a venv with its own PyTorch and what the bundle leaves to the machine
    base = getattr(sys, "_base_executable", None) or shutil.which("python3")
    venv = work / "venv"
    _run([base, "-m", "venv", str(venv)], "venv")
    py = str(venv / "bin" / "python")
    machine = sorted({r for reqs in bundle_manifest["machine_requirements"].values() for r in reqs
                      if not r.startswith(("torch", "torchvision"))})
    _run([py, "-m", "pip", "install", "-q", *TORCH, *machine], "machine image")

    site, report = work / "site", work / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               PYTHON=py, D2SEG_TARGET=str(site), GPU_OFFLINE_BUDGET_S="3000", GPU_OFFLINE_BUILD_TIMEOUT_S="1500",
               OMP_NUM_THREADS="1", MAX_JOBS="2", DETECTRON2_DATASETS=str(work / "datasets"))
    out = _run(["bash", "tools/gpu_offline.sh", str(report), "--", "--allow-cpu-smoke", "--config-file",
                "configs/CondInst/condinst_R18_shapes.yaml", "--opts", *TINY_SHAPES],
               "gpu_offline.sh", cwd=work / "repo", env=env)
    print(f"\nrehearsal step times (s): {TIMES}")

    status = json.loads((report / "offline.json").read_text())
    assert status["status"] == "gpu_check exit status 0", out.stdout[-3000:]
    assert set(status["steps_s"]) == {"install", "check", "build", "run", "total"}
    assert status["python"].startswith(LOCAL_PYTHON) and status["torch"].startswith(TORCH[0].split("==")[1])
    assert status["cuda_kernels_built"] is False and status["bundle_manifest"]["python"] == LOCAL_PYTHON

    r = json.loads((report / "gpu_check.json").read_text())
    assert r["mode"] == "cpu-smoke" and r["verdict"] == "pass", r["failed_sections"]
    assert all(s["status"] == "pass" for s in r["sections"].values())
    env_text = r["sections"]["environment"]["collect_env"]
    # d2seg and Detectron2 come from the install folder, over the machine's numpy 2
    assert re.search(r"d2seg\s.*@" + re.escape(str(site / "d2seg")), env_text), env_text
    assert re.search(r"detectron2\s.*@" + re.escape(str(site / "detectron2")), env_text), env_text
    assert re.search(r"numpy\s+2\.", env_text), env_text
    (train,) = r["sections"]["train"]["configs"]
    assert train["iterations"] == 2 and train["losses_finite"]
    assert r["sections"]["tests"]["counts"]["passed"] > 0
    assert "**Verdict: PASS**" in (report / "gpu_check.md").read_text()
    with tarfile.open(report / "gpu_check_logs.tar.gz") as t:
        logs = t.getnames()
    assert "./pytest.xml" in logs and any(n.endswith("train.log") for n in logs)
    # the PyTorch is the machine's: nothing of it went into the install folder
    assert not (site / "torch").exists() and not (site / "numpy").exists()
    assert list((site / "d2seg").glob("_C*.so")) and (site / "fvcore").is_dir()
