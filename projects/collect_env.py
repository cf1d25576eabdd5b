"""Environment report for bug reports: ``python -m d2seg.collect_env``."""
import os
import platform
import sys


def collect_env_info():
    rows = [("sys.platform", sys.platform), ("Python", sys.version.replace("\n", " "))]
    try:
        import numpy as np

        rows.append(("numpy", np.__version__))
    except ImportError:
        rows.append(("numpy", "not found"))
    import torch
    import torchvision

    rows.append(("PyTorch", f"{torch.__version__} @{os.path.dirname(torch.__file__)}"))
    rows.append(("PyTorch built with CUDA", str(torch.version.cuda)))
    rows.append(("torchvision", torchvision.__version__))
    try:
        import detectron2

        d2_dir = os.path.dirname(detectron2.__file__)
        rows.append(("detectron2", f"{detectron2.__version__} @{d2_dir}"))
        try:
            from detectron2 import _C  # noqa: F401

            kind = "source build (with its compiled _C)"
        except ImportError:
            kind = "Python-only install (no detectron2._C: registry wheel route)"
        rows.append(("detectron2 build", kind))
    except ImportError as e:
        rows.append(("detectron2", f"not importable: {e}"))

    import d2seg
    from d2seg.layers.extension import extension_error, load_extension, op_precision_support

    rows.append(("d2seg", f"{d2seg.__version__} @{os.path.dirname(d2seg.__file__)}"))
    ext = load_extension()
    if ext is None:
        rows.append(("d2seg._C", f"NOT available: {extension_error()}"))
    else:
        rows.append(("d2seg._C", f"built for torch {ext.torch_version} with {ext.compiler_version()}"))
        rows.append(("d2seg._C CUDA kernels", f"yes (CUDA {ext.cuda_version()})" if ext.has_cuda() else "no (CPU only)"))
        rows.append(
            (
                "d2seg._C CPU threads",
                f"OpenMP, {torch.get_num_threads()} threads" if ext.has_openmp() else "one thread (built without OpenMP)",
            )
        )
        for r in op_precision_support():
            autocast = f"autocast ({', '.join(r['autocast'])}): {r['policy']}" if r["autocast"] else "no autocast policy"
            rows.append((f"d2seg::{r['op']}", f"{' '.join(r['dtypes'])}; {autocast}"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = ".".join(map(str, torch.cuda.get_device_capability(i)))
            rows.append((f"GPU {i}", f"{torch.cuda.get_device_name(i)} (sm {cap})"))
    else:
        rows.append(("GPU", "none available (CPU only)"))
    rows.append(("CPU threads", f"{torch.get_num_threads()} (os.cpu_count()={os.cpu_count()})"))
    rows.append(("machine", platform.machine()))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main():
    print(collect_env_info())


if __name__ == "__main__":
    main()
