#!/usr/bin/env python
"""A folder of wheels that installs d2seg's needs on a machine without network, on top of
that machine's own PyTorch (docs/gpu.md).

    python tools/gpu_bundle.py build [--out gpu_bundle] [--python-version 3.12]   # here, with PyPI
    python tools/gpu_bundle.py check --bundle gpu_bundle                          # there, after the install

``build`` resolves, with pip's own resolver, the needs of d2seg (requirements.txt) and of
Detectron2 (the registry-wheel route of tools/setup.sh) for one CPython version on manylinux
x86-64, and keeps the wheels that the target machine does not already have: by default the
lent GPU machine's image (`GPU_IMAGE_PACKAGES`: PyTorch, numpy, opencv, scipy, pytest, ...),
whose versions are what the offline run tests. Pure-Python packages that PyPI has only as
sources (fvcore, antlr4-python3-runtime) are built into wheels here. Detectron2's Python
files come from the registry wheel sal-detectron2 (a CPython 3.10 build) repackaged as a
pure-Python wheel: its 3.10 binary `_C` is left out (Detectron2 then takes its pure-Python
fallbacks) and its `numpy<2` pin is relaxed to `numpy`, because the only call that numpy 2
breaks (`np.array(..., copy=False)` in `detectron2.layers.mask_ops.paste_mask_in_image_old`)
is called by neither Detectron2 nor d2seg, while the GPU image's PyTorch, opencv and scipy
are built for numpy 2. The folder gets a manifest, bundle.json: target Python, wheels, and
the requirements that the machine must meet itself.

``check`` runs on the target machine after `pip install --no-index --target DIR` with DIR
first on PYTHONPATH: the Python version matches the bundle's, every bundled distribution is
the one Python imports, and every requirement of the bundle (its wheels' Requires-Dist and
the manifest's machine requirements) is met by what Python sees; each miss is named.
Only the standard library and `packaging` (pip's own copy if need be) are used.
"""
import argparse
import base64
import csv
import datetime
import email.parser
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "bundle.json"
MAX_MIB = 60.0
DETECTRON2_WHEEL = "sal-detectron2==0.7.2"
DETECTRON2_LOCAL_LABEL = "pyonly"
# Oldest glibc first; pip matches each tag exactly. glibc 2.28 (RHEL 8, Ubuntu 20.04) and newer.
PLATFORMS = ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")
# Packages of the lent GPU machine's image ('cuda', as read on 2026-11-17; the device notes
# list them): not bundled, so that the machine's own builds (PyTorch for its CUDA, numpy 2,
# opencv, scipy, pytest and its plug-ins) are the ones tested. setuptools is bundled anyway
# (< 81, for pkg_resources, which detectron2.model_zoo imports).
GPU_IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
ALWAYS_BUNDLED = frozenset({"setuptools"})


def log(msg):
    print(f"[gpu_bundle] {msg}", flush=True)


def _packaging():
    """The `packaging` modules (requirements, markers, utils): the installed distribution,
    else pip's vendored copy."""
    try:
        from packaging import markers, requirements, utils, version
    except ImportError:
        from pip._vendor.packaging import markers, requirements, utils, version
    return requirements, markers, utils, version


def canonical(name):
    return _packaging()[2].canonicalize_name(name)


# ---------------------------------------------------------------------------- wheels


def wheel_metadata(path):
    """The METADATA of a wheel file as an email.message.Message."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode("utf-8"))


def target_environment(python_version):
    """PEP 508 marker values of CPython `python_version` ("3.12") on Linux x86-64."""
    return {"python_version": python_version, "python_full_version": python_version + ".0",
            "implementation_name": "cpython", "implementation_version": python_version + ".0",
            "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "os_name": "posix", "platform_release": "", "platform_version": "",
            "extra": ""}


def requirements_of(metadata, environment=None):
    """The Requires-Dist of a distribution's metadata that apply without extras, as
    packaging Requirement objects; markers are evaluated in `environment` (a dict of marker
    values; None: the running interpreter's)."""
    requirements = _packaging()[0]
    out = []
    for line in metadata.get_all("Requires-Dist") or []:
        req = requirements.Requirement(line)
        env = dict(environment or {}, extra="")
        if req.marker is None or req.marker.evaluate(env):
            out.append(req)
    return out


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pure_python_wheel(src, out_dir, local_label=DETECTRON2_LOCAL_LABEL, relax=("numpy",)):
    """Repackage a binary wheel as a pure-Python one: compiled modules (*.so, *.pyd) are left
    out, the tag becomes py3-none-any, the version gets the local label `+local_label`, and
    the upper bounds on the names in `relax` are dropped from its Requires-Dist. Returns the
    new wheel's path."""
    requirements = _packaging()[0]
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        metadata = email.parser.Parser().parsestr(z.read(info + "/METADATA").decode("utf-8"))
        dist, version = metadata["Name"], metadata["Version"]  # the header fields
        new_version = f"{version}+{local_label}"
        stem = f"{re.sub(r'[-_.]+', '_', dist).lower()}-{new_version}"
        new_info = stem + ".dist-info"
        files = {}
        for n in names:
            if n.endswith("/") or n.endswith((".so", ".pyd")) or n.startswith(info + "/"):
                continue
            files[n] = z.read(n)
        header, _, body = z.read(info + "/METADATA").decode("utf-8").partition("\n\n")
        lines = []
        for line in header.splitlines():
            if line.startswith("Version:"):
                line = f"Version: {new_version}"
            elif line.startswith("Requires-Dist:"):
                req = requirements.Requirement(line.split(":", 1)[1].strip())
                if canonical(req.name) in {canonical(r) for r in relax} and req.specifier:
                    kept = [s for s in req.specifier if s.operator not in ("<", "<=", "==", "~=")]
                    marker = f"; {req.marker}" if req.marker else ""
                    line = f"Requires-Dist: {req.name}{','.join(str(s) for s in kept)}{marker}"
            lines.append(line)
        files[new_info + "/METADATA"] = ("\n".join(lines) + "\n" + ("\n" + body if body else "")).encode()
        files[new_info + "/WHEEL"] = (
            "Wheel-Version: 1.0\nGenerator: d2seg tools/gpu_bundle.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ).encode()
        for n in names:  # the rest of the dist-info folder (top_level.txt, licenses, ...)
            if n.startswith(info + "/") and not n.endswith("/") and n.split("/", 1)[1] not in ("METADATA", "WHEEL",
                                                                                                  "RECORD"):
                files[new_info + "/" + n.split("/", 1)[1]] = z.read(n)
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for n, data in files.items():
        writer.writerow([n, _record_hash(data), len(data)])
    writer.writerow([new_info + "/RECORD", "", ""])
    files[new_info + "/RECORD"] = record.getvalue().encode()
    path = os.path.join(out_dir, stem + "-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    return path


# ---------------------------------------------------------------------------- build


def _pip(*args):
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]


def read_requirements(path):
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    with open(path) as f:
        lines = [l.split("#", 1)[0].strip() for l in f]
    return [l for l in lines if l]


def build_source_only(requirements, wheelhouse):
    """Wheels, built here into `wheelhouse`, of the packages of the closure of `requirements`
    that PyPI has only as sources (found by pip's resolver for this interpreter, a dry run
    that reads metadata only). Each must give a pure-Python wheel, which then serves any
    target Python. Returns the pinned requirements built."""
    report = os.path.join(wheelhouse, "resolution.json")
    proc = subprocess.run(_pip("install", "-q", "--dry-run", "--ignore-installed", "--report", report,
                               *requirements), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_bundle: pip could not resolve {requirements}:\n{proc.stderr[-3000:]}")
    with open(report) as f:
        items = json.load(f)["install"]
    os.remove(report)
    pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in items
            if not i["download_info"]["url"].endswith(".whl")]
    for pin in pins:
        log(f"{pin} has no wheel on PyPI: building one from its source")
        b = subprocess.run(_pip("wheel", "-q", "--no-deps", "-w", wheelhouse, pin), capture_output=True, text=True)
        if b.returncode != 0:
            raise SystemExit(f"gpu_bundle: could not build {pin} from its source:\n{b.stderr[-3000:]}")
    impure = [f for f in os.listdir(wheelhouse) if f.endswith(".whl") and not f.endswith("-none-any.whl")]
    if impure:
        raise SystemExit(f"gpu_bundle: {impure} are not pure Python: they need wheels for the target platform, "
                         f"which PyPI does not have")
    return pins


def download(requirements, dest, python_version, platforms, wheelhouse):
    """pip's resolver over `requirements` for CPython `python_version` on `platforms`: every
    wheel of the closure into `dest` (wheels only: PyPI's, or those in `wheelhouse`)."""
    abi = "cp" + python_version.replace(".", "")
    cmd = _pip("download", "-q", "--only-binary=:all:", "--python-version", python_version, "--implementation",
               "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", "--find-links", wheelhouse, "-d", dest)
    for p in platforms:
        cmd += ["--platform", p]
    proc = subprocess.run(cmd + list(requirements), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"gpu_bundle: pip download failed for Python {python_version}:\n{proc.stderr[-3000:]}")


def bundle_requirements(requirements_file, provided):
    """The top-level requirements to bundle (requirements.txt less the machine's packages,
    plus Detectron2) and the names of requirements.txt that the machine provides."""
    requirements = _packaging()[0]
    bundle, machine = [], []
    for line in read_requirements(requirements_file):
        req = requirements.Requirement(line)
        if canonical(req.name) in provided:
            # its pin in requirements.txt is for `make install`'s environment (numpy<2 and
            # opencv<4.12 there); on the target machine its own version is the one tested
            machine.append(req.name)
        else:
            bundle.append(line)
    bundle.append(DETECTRON2_WHEEL)
    return bundle, machine


def build(args):
    provided = {canonical(n) for n in GPU_IMAGE_PACKAGES} | {canonical(n) for n in args.provide}
    provided -= {canonical(n) for n in ALWAYS_BUNDLED} | {canonical(n) for n in args.bundle}
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    tmp = tempfile.mkdtemp(prefix="gpu_bundle-")
    try:
        wheelhouse, dest = os.path.join(tmp, "wheelhouse"), os.path.join(tmp, "download")
        os.makedirs(wheelhouse)
        log(f"Detectron2: the Python files of {DETECTRON2_WHEEL} as a pure-Python wheel")
        d2 = os.path.join(tmp, "detectron2")
        subprocess.run(_pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
                            "-d", d2, DETECTRON2_WHEEL), check=True)
        (src,) = [os.path.join(d2, f) for f in os.listdir(d2) if f.endswith(".whl")]
        pure_python_wheel(src, wheelhouse)

        reqs, machine_names = bundle_requirements(args.requirements, provided)
        build_source_only([r for r in reqs if r != DETECTRON2_WHEEL], wheelhouse)
        log(f"resolving for CPython {args.python_version} ({', '.join(args.platform)}): {' '.join(reqs)}")
        download(reqs, dest, args.python_version, args.platform, wheelhouse)

        env = target_environment(args.python_version)
        kept, dropped, needs = [], [], {}
        for f in sorted(os.listdir(dest)):
            meta = wheel_metadata(os.path.join(dest, f))
            if canonical(meta["Name"]) in provided:
                dropped.append(f"{meta['Name']}=={meta['Version']}")
                continue
            shutil.copy(os.path.join(dest, f), out)
            kept.append({"file": f, "name": meta["Name"], "version": meta["Version"],
                         "bytes": os.path.getsize(os.path.join(out, f))})
            for req in requirements_of(meta, env):
                if canonical(req.name) in provided:
                    needs.setdefault(canonical(req.name), []).append(f"{req.name}{req.specifier}".strip())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ["torch", "torchvision"] + machine_names:  # PyTorch: setup.sh installs it apart
        needs.setdefault(canonical(name), []).append(name)
    size = sum(w["bytes"] for w in kept)
    manifest = {
        "python": args.python_version,
        "platforms": list(args.platform),
        "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "built_at_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True).stdout.strip() or None,
        "requirements_file": os.path.relpath(os.path.abspath(args.requirements), REPO),
        "wheels": kept,
        "bytes": size,
        # what the target machine must have itself, as requirement strings (one per need)
        "machine_requirements": {k: sorted(set(v)) for k, v in sorted(needs.items())},
        "left_to_the_machine": sorted(dropped),
    }
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"{len(kept)} wheels, {size / 2**20:.1f} MiB in {args.out}; the machine provides: "
        f"{', '.join(sorted(needs))}")
    if size > args.max_mib * 2**20:
        raise SystemExit(f"gpu_bundle: the bundle is {size / 2**20:.1f} MiB, over the limit of {args.max_mib} MiB "
                         f"(largest: {sorted(kept, key=lambda w: -w['bytes'])[0]['file']})")
    return manifest


# ---------------------------------------------------------------------------- check


def check(bundle, target=None, skipped=()):
    """Problems (a list of sentences; empty: all is well) with the bundle as Python sees it
    now: its Python version, whether each bundled distribution is the one imported (from
    `target` when given), and whether every requirement is met. The bundled distributions
    named in `skipped` were left out of the install because the machine has their package
    (tools/gpu_offline.sh keeps a Detectron2 that imports already): they are not checked."""
    import importlib.metadata as md

    requirements, _, _, version = _packaging()
    with open(os.path.join(bundle, MANIFEST)) as f:
        manifest = json.load(f)
    problems = []
    here = "{}.{}".format(*sys.version_info[:2])
    if here != manifest["python"]:
        problems.append(f"the bundle {bundle} was built for Python {manifest['python']}, this is Python {here}: "
                        f"rebuild it with `python tools/gpu_bundle.py build --python-version {here}`")
    wanted = list(manifest["machine_requirements"].items())
    skipped = {canonical(n) for n in skipped}
    for wheel in manifest["wheels"]:
        if canonical(wheel["name"]) in skipped:
            continue
        try:
            dist = md.distribution(wheel["name"])
        except md.PackageNotFoundError:
            problems.append(f"{wheel['name']} (bundled, {wheel['file']}) is not importable: was the bundle installed "
                            f"and is its folder on PYTHONPATH?")
            continue
        if dist.version != wheel["version"]:
            problems.append(f"{wheel['name']}: Python finds {dist.version} at {dist.locate_file('')}, not the "
                            f"bundled {wheel['version']}: put the install folder first on PYTHONPATH")
        elif target and os.path.realpath(str(dist.locate_file(""))) != os.path.realpath(target):
            problems.append(f"{wheel['name']} {dist.version} is found at {dist.locate_file('')}, not in {target}")
        wanted += [(canonical(r.name), [str(r)]) for r in requirements_of(dist.metadata)]
    for name, reqs in wanted:
        for line in reqs:
            req = requirements.Requirement(line)
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{req.name} is needed ({line}) but not installed on this machine: rebuild the "
                                f"bundle with `--bundle {req.name}`")
                continue
            if req.specifier and not req.specifier.contains(version.Version(have), prereleases=True):
                problems.append(f"{req.name} {have} is installed, but {line} is needed: rebuild the bundle with "
                                f"`--bundle {req.name}`")
    return sorted(set(problems))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the bundle (needs PyPI)")
    b.add_argument("--out", default=os.path.join(REPO, "gpu_bundle"), help="the bundle folder (replaced)")
    b.add_argument("--python-version", default="3.12", help="target CPython X.Y (default 3.12, the GPU machine's)")
    b.add_argument("--platform", action="append", default=None,
                   help=f"pip platform tag, repeatable (default: {' '.join(PLATFORMS)})")
    b.add_argument("--requirements", default=os.path.join(REPO, "requirements.txt"))
    b.add_argument("--provide", action="append", default=[], metavar="NAME",
                   help="a package the target machine has too (not bundled); repeatable")
    b.add_argument("--bundle", action="append", default=[], metavar="NAME",
                   help="bundle NAME even if the GPU image has it; repeatable")
    b.add_argument("--max-mib", type=float, default=MAX_MIB, help=f"fail above this size (default {MAX_MIB:g})")
    c = sub.add_parser("check", help="on the target machine, after the install")
    c.add_argument("--bundle", default=os.path.join(REPO, "gpu_bundle"))
    c.add_argument("--target", default=None, help="the folder the bundle was installed into")
    c.add_argument("--skipped", action="append", default=[], metavar="NAME",
                   help="a bundled distribution the install left out (the machine has it); repeatable")
    args = p.parse_args(argv)
    if args.command == "build":
        args.platform = args.platform or list(PLATFORMS)
        build(args)
        return 0
    problems = check(args.bundle, args.target, args.skipped)
    for problem in problems:
        print(f"gpu_bundle check: {problem}", file=sys.stderr)
    if not problems:
        log(f"check: every requirement of {args.bundle} is met")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
