"""The compiled extension d2seg._C: it imports, reports its build, and its ops are
registered under torch.ops.d2seg and agree with their references."""
import subprocess
import sys

import pytest
import torch

import d2seg
from d2seg.layers import axpy
from d2seg.layers.extension import axpy_reference, extension_available, load_extension


def test_extension_is_built_and_registers_ops():
    assert extension_available(), "d2seg._C did not import: run `make install`"
    ext = load_extension()
    assert ext.torch_version == torch.__version__.split("+")[0]
    assert isinstance(ext.has_cuda(), bool)
    assert hasattr(torch.ops.d2seg, "axpy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_axpy_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=g, dtype=dtype)
    y = torch.randn(3, 1000, generator=g, dtype=dtype).t()  # non-contiguous
    x = x.t()
    out = torch.ops.d2seg.axpy(x, y, 0.5)
    torch.testing.assert_close(out, axpy_reference(x, y, 0.5))
    assert axpy(torch.empty(0), torch.empty(0)).shape == (0,)


def test_axpy_errors_are_clear():
    with pytest.raises(ValueError, match="same shape"):
        axpy(torch.ones(2), torch.ones(3))
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.d2seg.axpy(torch.ones(2), torch.ones(3), 1.0)


def test_missing_extension_falls_back_with_one_clear_warning():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from d2seg.layers import axpy\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = axpy(torch.ones(2), torch.ones(2), 2.0)\n"
        "    b = axpy(torch.ones(2), torch.ones(2), 2.0)\n"
        "assert a.tolist() == [3.0, 3.0] and b.tolist() == [3.0, 3.0]\n"
        "msgs = [str(x.message) for x in w if 'd2seg._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
    )
    env = dict(__import__("os").environ, D2SEG_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "not available" in out.stdout and "pure-PyTorch reference" in out.stdout


def test_collect_env_reports_versions():
    out = subprocess.run(
        [sys.executable, "-m", "d2seg.collect_env"], capture_output=True, text=True, check=True
    ).stdout
    for key in ("PyTorch", "torchvision", "detectron2", "detectron2 build", "d2seg._C", "d2seg._C CUDA kernels", "d2seg._C CPU threads"):
        assert key in out
    assert d2seg.__version__ in out


def test_collect_env_reports_each_ops_half_precision_and_autocast_policy():
    out = subprocess.run(
        [sys.executable, "-m", "d2seg.collect_env"], capture_output=True, text=True, check=True
    ).stdout
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith("d2seg::")}
    assert set(lines) == {"d2seg::instance_aware_conv", "d2seg::dynamic_mask_head", "d2seg::sample_points"}
    for line in lines.values():
        assert "float16 bfloat16" in line and "autocast (CPU, CUDA)" in line
    assert "coords, boxes -> float32" in lines["d2seg::sample_points"]
