"""Builds the `d2seg` package (Python sources in projects/) and its compiled extension
`d2seg._C` (csrc/).

The C++ (CPU) sources are always built. The CUDA sources (csrc/**/*.cu) are added when a
CUDA toolkit is found, or when FORCE_CUDA=1; FORCE_CUDA=0 forces a CPU-only build. A CUDA
build still runs its CPU kernels on a machine without a GPU.
"""
import glob
import sys
import os
import shutil
import sysconfig

from setuptools import setup

# torch guesses CUDA_HOME from `which nvcc`; when nvcc is a symlink in /usr/local/bin that
# guess is /usr/local and the link fails on -lcudart. Prefer the real toolkit folder.
if not os.environ.get("CUDA_HOME") and os.environ.get("FORCE_CUDA") != "0":
    _nvcc = shutil.which("nvcc")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    elif _nvcc:
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(_nvcc)))

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    if force == "1":
        return True
    return CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def get_extensions():
    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    sources = [os.path.relpath(s, ROOT) for s in sources]
    cuda_sources = [os.path.relpath(s, ROOT) for s in cuda_sources]

    # -fopenmp: at::parallel_for is a header template that runs its loop in an OpenMP
    # parallel region only when the including file is compiled with OpenMP; without it
    # every CPU kernel would run on one thread. The extension then links the libgomp that
    # torch has already loaded (same soname), so there is one OpenMP runtime.
    # (Apple clang has no -fopenmp; there the CPU kernels stay single-threaded, as
    # d2seg._C.has_openmp() then reports.)
    openmp = [] if sys.platform == "darwin" else ["/openmp"] if sys.platform == "win32" else ["-fopenmp"]
    extra_compile_args = {"cxx": ["-O3"] + openmp}
    extra_link_args = [] if sys.platform == "win32" else openmp
    define_macros = []
    include_dirs = [csrc]
    extension = CppExtension
    if _want_cuda():
        extension = CUDAExtension
        sources += cuda_sources
        define_macros += [("WITH_CUDA", None)]
        extra_compile_args["nvcc"] = [
            "-O3",
            "--expt-relaxed-constexpr",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ]
        # cusparse.h and friends ship in the nvidia wheels, not always in the toolkit.
        purelib = sysconfig.get_paths()["purelib"]
        include_dirs += sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*", "include")))
        print(f"[d2seg] building with CUDA kernels (CUDA_HOME={CUDA_HOME})")
    else:
        print("[d2seg] building CPU-only (no CUDA toolkit found, or FORCE_CUDA=0)")

    return [
        extension(
            "d2seg._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


def get_packages():
    packages = ["d2seg"]
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "projects")):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        rel = os.path.relpath(dirpath, os.path.join(ROOT, "projects"))
        if rel != "." and "__init__.py" in filenames:
            packages.append("d2seg." + rel.replace(os.sep, "."))
    return packages


def get_package_data():
    # configs/ ships inside the package as d2seg/model_zoo/configs (see d2seg.model_zoo).
    configs = os.path.join(ROOT, "configs")
    files = [os.path.relpath(os.path.join(d, f), configs).replace(os.sep, "/")
             for d, _, fs in os.walk(configs) for f in fs if f.endswith(".yaml")]
    return {"d2seg.model_zoo.configs": sorted(files)}


setup(
    name="d2seg",
    version="0.1.0",
    description="Instance and semantic segmentation methods for Detectron2",
    python_requires=">=3.9",
    packages=get_packages() + ["d2seg.model_zoo.configs"],
    package_dir={"d2seg": "projects", "d2seg.model_zoo.configs": "configs"},
    package_data=get_package_data(),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
