"""tools/gpu_bundle.py and tools/gpu_offline.sh, the offline route to the GPU check
(docs/gpu.md), on real files: a binary wheel repackaged as a pure-Python one and installed
by pip, the requirement check over real dist-info folders on PYTHONPATH, the split of
requirements.txt between the bundle and the machine, and the offline script's refusal
without a bundle. The whole route is rehearsed in tests/test_gpu_offline.py (slow)."""
import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, load_script


@pytest.fixture(scope="module")
def gb():
    return load_script("tools/gpu_bundle.py")


def _binary_wheel(folder):
    """A wheel shaped like sal-detectron2's: CPython 3.10 tag, a compiled module, a numpy<2 pin."""
    info = "demo_pkg-0.7.2.dist-info"
    files = {
        "demo_pkg/__init__.py": b"__version__ = '0.7.2'\n",
        "demo_pkg/_C.cpython-310-x86_64-linux-gnu.so": b"\x7fELF not really",
        "demo_pkg/model_zoo/configs/Base.yaml": b"MODEL: {}\n",
        f"{info}/METADATA": (b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.7.2\n"
                             b"Requires-Dist: numpy<2\nRequires-Dist: tabulate>=0.8\n"
                             b"Requires-Dist: timm; extra == \"all\"\n"),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp310-cp310-linux_x86_64\n",
        f"{info}/top_level.txt": b"demo_pkg\n",
        f"{info}/RECORD": b"",
    }
    path = os.path.join(folder, "demo_pkg-0.7.2-cp310-cp310-linux_x86_64.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_a_binary_wheel_becomes_a_pure_python_wheel_that_pip_installs(tmp_path, gb):
    new = gb.pure_python_wheel(_binary_wheel(str(tmp_path)), str(tmp_path))
    assert os.path.basename(new) == "demo_pkg-0.7.2+pyonly-py3-none-any.whl"
    with zipfile.ZipFile(new) as z:
        names = set(z.namelist())
        info = "demo_pkg-0.7.2+pyonly.dist-info"
        assert not any(n.endswith(".so") for n in names)
        assert {"demo_pkg/__init__.py", "demo_pkg/model_zoo/configs/Base.yaml", f"{info}/RECORD"} <= names
        assert "Tag: py3-none-any" in z.read(f"{info}/WHEEL").decode()
        meta = z.read(f"{info}/METADATA").decode()
        # the upper bound on numpy is gone, the other requirements stay as they were
        assert "Requires-Dist: numpy\n" in meta and "numpy<2" not in meta
        assert "Requires-Dist: tabulate>=0.8" in meta and 'extra == "all"' in meta
        assert "Version: 0.7.2+pyonly" in meta
        rows = list(csv.reader(io.StringIO(z.read(f"{info}/RECORD").decode())))
        assert {r[0] for r in rows} == names
        for name, digest, size in rows:
            if name.endswith("RECORD"):
                continue
            data = z.read(name)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == "sha256=" + want and int(size) == len(data), name
    # pip checks RECORD and the tag: the wheel installs offline, and Python sees its version
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    new], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, demo_pkg; "
                          "print(m.version('demo-pkg'), demo_pkg.__file__)"],
                         env=dict(os.environ, PYTHONPATH=str(target)), capture_output=True, text=True, check=True)
    version, module = out.stdout.split()
    assert version == "0.7.2+pyonly" and module.startswith(str(target))


def _dist(site, name, version, requires=()):
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return {"file": f"{name}-{version}-py3-none-any.whl", "name": name, "version": version, "bytes": 1}


def _check(bundle, site, python=None, pythonpath=None, extra=()):
    """`gpu_bundle.py check` as the offline script runs it: the install folder on PYTHONPATH
    (or ``pythonpath``), the manifest's Python this one's unless ``python``."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["python"] = python or "{}.{}".format(*sys.version_info[:2])
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_bundle.py"), "check", "--bundle",
                           str(bundle), "--target", str(site), *extra], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=pythonpath or str(site)))


def test_check_names_each_unmet_requirement(tmp_path):
    site, bundle = tmp_path / "site", tmp_path / "bundle"
    bundle.mkdir()
    wheels = [_dist(site, "demo-a", "1.0", ["demo-b>=2", "pytest"]), _dist(site, "demo-b", "2.1")]
    manifest = {"python": "", "wheels": wheels, "machine_requirements": {"pytest": ["pytest>=1"]}}
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    ok = _check(bundle, site)
    assert ok.returncode == 0 and "every requirement" in ok.stdout, ok.stderr

    # a machine package too old, one missing, a bundled one absent, another Python
    manifest["machine_requirements"] = {"pytest": ["pytest>=999"], "no-such-pkg-d2seg": ["no-such-pkg-d2seg"]}
    manifest["wheels"].append({"file": "demo_c-1.0-py3-none-any.whl", "name": "demo-c", "version": "1.0", "bytes": 1})
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    bad = _check(bundle, site, python="3.99")
    assert bad.returncode == 1
    err = bad.stderr
    assert "was built for Python 3.99" in err and "--python-version" in err
    assert "pytest>=999 is needed" in err and "--bundle pytest" in err
    assert "no-such-pkg-d2seg is needed" in err and "not installed" in err
    assert "demo-c (bundled, demo_c-1.0-py3-none-any.whl) is not importable" in err


def test_check_sees_a_bundled_package_shadowed_by_another_copy(tmp_path):
    site, bundle, other = tmp_path / "site", tmp_path / "bundle", tmp_path / "other"
    bundle.mkdir()
    _dist(other, "demo-a", "0.5")  # an older copy earlier on the path
    wheels = [_dist(site, "demo-a", "1.0")]
    (bundle / "bundle.json").write_text(json.dumps({"python": "", "wheels": wheels, "machine_requirements": {}}))
    out = _check(bundle, site, pythonpath=f"{other}{os.pathsep}{site}")
    assert out.returncode == 1
    assert "demo-a: Python finds 0.5" in out.stderr and "first on PYTHONPATH" in out.stderr


def test_check_leaves_out_a_wheel_the_install_skipped(tmp_path):
    """gpu_offline.sh does not install the bundle's Detectron2 where `import detectron2`
    works already, and passes --skipped for it: the check then does not ask for that wheel
    (it failed on every such machine)."""
    site, bundle = tmp_path / "site", tmp_path / "bundle"
    bundle.mkdir()
    wheels = [_dist(site, "demo-a", "1.0"),
              {"file": "sal_detectron2-0.7.2+pyonly-py3-none-any.whl", "name": "sal-detectron2",
               "version": "0.7.2+pyonly", "bytes": 1}]
    (bundle / "bundle.json").write_text(json.dumps({"python": "", "wheels": wheels, "machine_requirements": {}}))
    assert "sal-detectron2 (bundled" in _check(bundle, site).stderr
    out = _check(bundle, site, extra=["--skipped", "sal-detectron2"])
    assert out.returncode == 0 and "every requirement" in out.stdout, out.stderr
    script = open(os.path.join(REPO, "tools", "gpu_offline.sh")).read()
    assert "SKIPPED=(--skipped sal-detectron2)" in script and '"${SKIPPED[@]}"' in script


def test_requirements_split_between_the_bundle_and_the_machine(tmp_path, gb):
    req = tmp_path / "requirements.txt"
    req.write_text("# pins\nnumpy<2\nopencv-python-headless<4.12\nfvcore>=0.1.5,<0.1.6  # sdist only\n"
                   "pycocotools\nPytest\nsetuptools<81\n")
    provided = {gb.canonical(n) for n in gb.GPU_IMAGE_PACKAGES} - set(gb.ALWAYS_BUNDLED)
    bundle, machine = gb.bundle_requirements(str(req), provided)
    # the machine's own numpy / opencv are tested, whatever requirements.txt pins for `make install`
    assert machine == ["numpy", "opencv-python-headless", "Pytest"]
    assert bundle == ["fvcore>=0.1.5,<0.1.6", "pycocotools", "setuptools<81", gb.DETECTRON2_WHEEL]
    # the GPU image's PyTorch and numpy are never bundled
    assert {"torch", "torchvision", "numpy", "scipy", "opencv-python-headless"} <= provided


def test_offline_script_refuses_without_a_bundle(tmp_path):
    out = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_offline.sh"), str(tmp_path / "report")],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHON=sys.executable, GPU_BUNDLE=str(tmp_path / "missing"),
                                  D2SEG_TARGET=str(tmp_path / "site")))
    assert out.returncode == 3, out.stdout + out.stderr
    assert "no bundle at" in out.stdout and "make gpu-bundle" in out.stdout
    status = json.loads((tmp_path / "report" / "offline.json").read_text())
    assert status["status"].startswith("failed: no bundle") and status["torch"] is None
    assert status["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert not (tmp_path / "site").exists()  # nothing was installed


def test_offline_script_takes_relative_paths_from_where_it_runs(tmp_path):
    """`bash /path/to/checkout/tools/gpu_offline.sh report` run elsewhere writes ./report
    there (the script works from the checkout, but a path the caller gives is the caller's)."""
    out = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_offline.sh"), "report"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHON=sys.executable, GPU_BUNDLE="missing_bundle"))
    assert out.returncode == 3, out.stdout + out.stderr
    assert f"no bundle at {tmp_path / 'missing_bundle'}" in out.stdout
    assert (tmp_path / "report" / "offline.json").is_file()
    assert not os.path.exists(os.path.join(REPO, "report"))


def test_make_targets_run_the_scripts():
    out = subprocess.run(["make", "-n", "gpu-bundle", "test-gpu-offline"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tools/gpu_bundle.py build" in out.stdout and "tools/gpu_offline.sh" in out.stdout
