"""Can the CUDA build of d2seg be checked here? torch.cuda and d2seg._C, read in a second,
without importing the d2seg package."""
import glob
import os
import sys

BUILD_HINT = "build the CUDA kernels with `FORCE_CUDA=1 make build` on a machine with the CUDA toolkit (nvcc)"


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
