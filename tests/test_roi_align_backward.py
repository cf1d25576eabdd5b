"""d2seg's CPU RoIAlign backward (csrc/roi_align/) against torchvision's own CPU kernel:
bit-identical gradients, chunked or not; its extra memory bounded; and no side effect of
``import d2seg``: torchvision's kernels stay as they were until
``use_fast_roi_align_backward()`` or d2seg's Trainer (``MODEL.FAST_ROI_ALIGN_BACKWARD``) asks.

torchvision's kernel is computed in a child process, first before d2seg is imported, then
after ``import d2seg`` and every d2seg module, on the same inputs."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import d2seg  # noqa: F401
from d2seg.layers import extension_available, use_fast_roi_align_backward, use_torchvision_roi_align_backward
from d2seg.layers.roi_align import (MAX_TABLE_BYTES, fast_roi_align_backward_active, roi_align_backward,
                                    sample_table_bound)

pytestmark = pytest.mark.skipif(not extension_available(), reason="d2seg._C not built")

# torchvision's kernel computes the reference gradients before d2seg is imported; the child
# then imports d2seg and all its modules and records what torchvision's ops look like:
# the dispatcher's table of every torchvision op (which kernel is registered for which
# device, and where) and whose kernel answers a call (d2seg's names itself in its errors),
# then the same after use_fast_roi_align_backward() and after undoing it.
CHILD = r"""
import importlib, pkgutil, sys
import torch, torchvision
cases = torch.load(sys.argv[1])
def run():
    return [torch.ops.torchvision._roi_align_backward(
        c["grad"], c["rois"], c["scale"], c["ph"], c["pw"], c["n"], c["c"], c["h"], c["w"],
        c["sr"], c["aligned"]) for c in cases]
def tables():
    return {op: torch._C._dispatch_dump(op) for op in torch._C._dispatch_get_all_op_names()
            if op.startswith("torchvision::")}
def answering_kernel():  # mismatched dtypes: both kernels refuse, each in its own words
    try:
        torch.ops.torchvision._roi_align_backward(torch.zeros(1, 1, 1, 1, dtype=torch.float64),
                                                  torch.zeros(1, 5), 1.0, 1, 1, 1, 1, 1, 1, 0, True)
    except RuntimeError as e:
        return "d2seg" if "d2seg roi_align_backward" in str(e) else "torchvision"
    return "none"
out = {"grads": run(), "tables": tables(), "kernel": answering_kernel()}
import d2seg
modules = [m.name for m in pkgutil.walk_packages(d2seg.__path__, "d2seg.") if not m.name.endswith("__main__")]
for name in modules:
    importlib.import_module(name)
from d2seg.layers import fast_roi_align_backward_active, use_fast_roi_align_backward, use_torchvision_roi_align_backward
out.update(modules=modules, after_import=run(), tables_after_import=tables(),
           kernel_after_import=answering_kernel(), active_after_import=fast_roi_align_backward_active())
out.update(registered=use_fast_roi_align_backward(), tables_fast=tables(), kernel_fast=answering_kernel(),
           active_fast=fast_roi_align_backward_active(), grads_fast=run())
use_torchvision_roi_align_backward()
out.update(tables_restored=tables(), kernel_restored=answering_kernel(),
           active_restored=fast_roi_align_backward_active())
torch.save(out, sys.argv[2])
"""


def _case(seed, dtype, n=2, c=5, h=13, w=17, k=9, ph=7, pw=5, scale=0.25, sr=0, aligned=True,
          transposed_grad=False):
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = h / scale, w / scale
    x0 = torch.rand(k, generator=g) * img_w * 1.2 - 0.1 * img_w  # some start outside the map
    y0 = torch.rand(k, generator=g) * img_h * 1.2 - 0.1 * img_h
    bw = torch.rand(k, generator=g) * img_w * 0.8
    bh = torch.rand(k, generator=g) * img_h * 0.8
    if k >= 4:
        bw[0] = 0.0  # a degenerate region
        bh[1] = 0.0
        x0[2], y0[2], bw[2], bh[2] = img_w + 10, img_h + 10, 5.0, 5.0  # entirely outside
        x0[3], y0[3], bw[3], bh[3] = 0.0, 0.0, img_w, img_h  # the whole map (border clamping)
    rois = torch.stack([torch.randint(0, n, (k,), generator=g).float(), x0, y0, x0 + bw, y0 + bh], 1)
    if transposed_grad:
        grad = torch.randn(k, c, pw, ph, generator=g).transpose(2, 3)
    else:
        grad = torch.randn(k, c, ph, pw, generator=g)
    return {"grad": grad.to(dtype), "rois": rois.to(dtype), "scale": scale, "ph": ph, "pw": pw, "n": n,
            "c": c, "h": h, "w": w, "sr": sr, "aligned": aligned}


CASES = [
    _case(0, torch.float32),
    _case(1, torch.float32, aligned=False),
    _case(2, torch.float32, sr=2),
    _case(3, torch.float64, k=20, c=3),
    _case(4, torch.float16, c=4),
    _case(5, torch.float32, transposed_grad=True),
    _case(6, torch.float32, n=4, c=64, h=32, w=32, k=64, ph=14, pw=14, scale=0.125),  # a mask head's
    _case(7, torch.float32, k=0),  # no regions
]


@pytest.fixture(scope="module")
def torchvision_grads(tmp_path_factory):
    d = tmp_path_factory.mktemp("roi_align")
    torch.save(CASES, d / "cases.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", CHILD, str(d / "cases.pt"), str(d / "out.pt")], check=True, env=env)
    return torch.load(d / "out.pt")


def _ours(c, **kw):
    return roi_align_backward(c["grad"], c["rois"], c["scale"], c["ph"], c["pw"], c["n"], c["c"], c["h"], c["w"],
                              c["sr"], c["aligned"], **kw)


@pytest.mark.parametrize("threads", [1, 2])
def test_bit_identical_to_torchvision(torchvision_grads, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (c, ref) in enumerate(zip(CASES, torchvision_grads["grads"])):
            ours = _ours(c)
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, i
            assert torch.equal(ours, ref), f"case {i}: max diff {(ours.double() - ref.double()).abs().max()}"
            if ref.numel() and c["rois"].numel():
                assert ref.abs().sum() > 0, f"case {i} tests nothing"
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("max_table_bytes", [1, 100, 5000])
def test_chunked_sample_table_is_bit_identical(torchvision_grads, max_table_bytes):
    """Small bounds cut the samples into many chunks (one sample each at 1 byte; chunks that
    end inside a region at 100 and 5000 bytes): the gradients do not change by one bit."""
    for i, (c, ref) in enumerate(zip(CASES, torchvision_grads["grads"])):
        entry, samples = sample_table_bound(c["grad"].dtype, max_table_bytes)
        assert samples == max(1, max_table_bytes // entry)
        assert torch.equal(_ours(c, max_table_bytes=max_table_bytes), ref), f"case {i}"


def test_sample_table_bound():
    """One table entry is 48 / 56 / 72 bytes in float16 / float32 / float64; a chunk holds as
    many as fit in the bound (at least one), and the default bound is the op's."""
    for dtype, entry in ((torch.float16, 48), (torch.float32, 56), (torch.float64, 72)):
        assert sample_table_bound(dtype) == (entry, MAX_TABLE_BYTES // entry)
        for bound in (1, entry - 1, entry, 10 * entry + 3, 2**20):
            e, samples = sample_table_bound(dtype, bound)
            assert samples == max(1, bound // entry) and (samples * e <= bound or samples == 1)
    schema = torch.ops.d2seg.roi_align_backward.default._schema
    default = [a.default_value for a in schema.arguments if a.name == "max_table_bytes"]
    assert default == [MAX_TABLE_BYTES] == [4 * 2**20]
    with pytest.raises(RuntimeError, match="max_table_bytes"):
        _ours(CASES[0], max_table_bytes=0)


def _peak_rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_extra_memory_is_bounded(one_thread):
    """400 regions of 14 x 14 bins with 9 x 9 samples each: an unchecked table would hold 6.4 M
    samples (356 MB); the kernel's peak memory stays within a few MB of its result."""
    k, p, size = 400, 14, 128
    rois = torch.tensor([[0.0, 2.0, 3.0, 120.0, 118.0]]).repeat(k, 1)  # 118 / 14 -> 9 samples per bin
    grad = torch.randn(k, 1, p, p)
    args = (grad, rois, 1.0, p, p, 1, 1, size, size, 0, True)
    _, samples = sample_table_bound(torch.float32)
    assert k * p * p * 9 * 9 > 80 * samples  # more than 80 chunks
    roi_align_backward(*args)  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    before = _peak_rss_kib()
    out = roi_align_backward(*args)
    grown_mib = (_peak_rss_kib() - before) / 1024
    assert grown_mib < 24, f"peak memory grew by {grown_mib:.0f} MiB"
    assert out.abs().sum() > 0


def test_import_leaves_torchvision_untouched(torchvision_grads):
    """``import d2seg`` and every d2seg module change no torchvision kernel: the dispatcher's
    tables are unchanged and torchvision's own kernel answers. The same checks see
    use_fast_roi_align_backward() (the positive control) and its undoing."""
    r = torchvision_grads
    assert len(r["modules"]) > 50 and "d2seg.modeling" in r["modules"] and "d2seg.engine.trainer" in r["modules"]
    assert any("roi_align_kernel.cpp" in t for t in r["tables"].values())
    assert r["tables_after_import"] == r["tables"]
    assert r["kernel"] == r["kernel_after_import"] == "torchvision"
    assert r["active_after_import"] is False
    for a, b in zip(r["grads"], r["after_import"]):
        assert torch.equal(a, b)
    # asked for: the CPU kernel of _roi_align_backward is d2seg's, with the same gradients
    assert r["registered"] is True and r["active_fast"] is True and r["kernel_fast"] == "d2seg"
    changed = [op for op in r["tables"] if r["tables_fast"][op] != r["tables"][op]]
    assert changed == ["torchvision::_roi_align_backward"]
    for a, b in zip(r["grads"], r["grads_fast"]):
        assert torch.equal(a, b)
    # undone: torchvision's kernel again
    assert r["tables_restored"] == r["tables"] and r["kernel_restored"] == "torchvision"
    assert r["active_restored"] is False


@pytest.fixture
def torchvision_kernel():
    """Start from torchvision's kernel (a Trainer built by an earlier test of the session may
    have registered d2seg's) and leave the process as it was."""
    was = fast_roi_align_backward_active()
    use_torchvision_roi_align_backward()
    yield
    (use_fast_roi_align_backward if was else use_torchvision_roi_align_backward)()


def test_torchvision_roi_align_uses_it_when_asked(torchvision_grads, torchvision_kernel):
    """Through torchvision.ops.roi_align's autograd (what Detectron2's ROIPooler calls)."""
    c = CASES[0]
    assert use_fast_roi_align_backward() and fast_roi_align_backward_active()
    x = torch.randn(c["n"], c["c"], c["h"], c["w"], requires_grad=True)
    out = torchvision.ops.roi_align(x, c["rois"], (c["ph"], c["pw"]), c["scale"], c["sr"], c["aligned"])
    out.backward(c["grad"])
    assert torch.equal(x.grad, torchvision_grads["grads"][0])
    with pytest.raises(RuntimeError, match="d2seg roi_align_backward"):
        torch.ops.torchvision._roi_align_backward(c["grad"].double(), c["rois"], 0.25, 7, 5, 2, 5, 13, 17, 0, True)
    use_torchvision_roi_align_backward()
    assert not fast_roi_align_backward_active()
    with pytest.raises(RuntimeError, match="grad should have the same type as rois"):  # torchvision's words
        torch.ops.torchvision._roi_align_backward(c["grad"].double(), c["rois"], 0.25, 7, 5, 2, 5, 13, 17, 0, True)


@pytest.mark.parametrize("enabled", [False, True])
def test_trainer_uses_it_by_config(enabled, tmp_path, torchvision_kernel):
    """d2seg's Trainer registers the kernel when MODEL.FAST_ROI_ALIGN_BACKWARD (True in d2seg's
    configs), and uses torchvision's kernel with False, even after d2seg's was registered."""
    from conftest import CONFIGS, tiny_opts
    from d2seg.config import get_d2seg_cfg
    from d2seg.engine import Trainer, setup_cfg

    assert get_d2seg_cfg().MODEL.FAST_ROI_ALIGN_BACKWARD is True
    cfg = setup_cfg(os.path.join(CONFIGS, "quick", "mask_rcnn_shapes.yaml"),
                    tiny_opts(tmp_path, max_iter=1, MODEL__FAST_ROI_ALIGN_BACKWARD=enabled))
    Trainer(cfg)
    assert fast_roi_align_backward_active() is enabled
    use_fast_roi_align_backward()
    Trainer(cfg)
    assert fast_roi_align_backward_active() is enabled


def test_bad_input_is_named():
    c = CASES[0]
    with pytest.raises(RuntimeError, match="rois must be"):
        roi_align_backward(c["grad"], c["rois"][:, :4], 0.25, 7, 5, 2, 5, 13, 17, 0, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        roi_align_backward(c["grad"].double(), c["rois"], 0.25, 7, 5, 2, 5, 13, 17, 0, True)
