"""d2seg's CPU RoIAlign backward (csrc/roi_align/) against torchvision's own CPU kernel:
bit-identical gradients, and registered as torchvision's CPU kernel by ``import d2seg``.

torchvision's kernel is computed in a child process that does not import d2seg (so its
kernel is the original one), on the same inputs."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import d2seg  # noqa: F401  (registers the kernel)
from d2seg.layers import extension_available
from d2seg.layers.roi_align import fast_roi_align_backward_active, roi_align_backward

pytestmark = pytest.mark.skipif(not extension_available(), reason="d2seg._C not built")

# Runs with D2SEG_TORCHVISION_ROI_ALIGN_BACKWARD=1: torchvision's own kernel computes the
# reference gradients; then importing d2seg must leave that kernel in place (the opt-out).
CHILD = r"""
import sys, torch, torchvision
cases = torch.load(sys.argv[1])
def run():
    return [torch.ops.torchvision._roi_align_backward(
        c["grad"], c["rois"], c["scale"], c["ph"], c["pw"], c["n"], c["c"], c["h"], c["w"],
        c["sr"], c["aligned"]) for c in cases]
out = run()
import d2seg
from d2seg.layers.roi_align import fast_roi_align_backward_active
torch.save({"grads": out, "after_import": run(), "active": fast_roi_align_backward_active()}, sys.argv[2])
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
    env = dict(os.environ, OMP_NUM_THREADS="1", D2SEG_TORCHVISION_ROI_ALIGN_BACKWARD="1")
    subprocess.run([sys.executable, "-c", CHILD, str(d / "cases.pt"), str(d / "out.pt")], check=True, env=env)
    return torch.load(d / "out.pt")


@pytest.mark.parametrize("threads", [1, 2])
def test_bit_identical_to_torchvision(torchvision_grads, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (c, ref) in enumerate(zip(CASES, torchvision_grads["grads"])):
            ours = roi_align_backward(c["grad"], c["rois"], c["scale"], c["ph"], c["pw"], c["n"], c["c"],
                                      c["h"], c["w"], c["sr"], c["aligned"])
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, i
            assert torch.equal(ours, ref), f"case {i}: max diff {(ours.double() - ref.double()).abs().max()}"
            if ref.numel() and c["rois"].numel():
                assert ref.abs().sum() > 0, f"case {i} tests nothing"
    finally:
        torch.set_num_threads(old)


def test_torchvision_roi_align_uses_it(torchvision_grads):
    """Through torchvision.ops.roi_align's autograd (what Detectron2's ROIPooler calls)."""
    assert fast_roi_align_backward_active()
    c = CASES[0]
    x = torch.randn(c["n"], c["c"], c["h"], c["w"], requires_grad=True)
    out = torchvision.ops.roi_align(x, c["rois"], (c["ph"], c["pw"]), c["scale"], c["sr"], c["aligned"])
    out.backward(c["grad"])
    assert torch.equal(x.grad, torchvision_grads["grads"][0])


def test_bad_input_is_named():
    c = CASES[0]
    with pytest.raises(RuntimeError, match="rois must be"):
        roi_align_backward(c["grad"], c["rois"][:, :4], 0.25, 7, 5, 2, 5, 13, 17, 0, True)
    with pytest.raises(RuntimeError, match="same dtype"):
        roi_align_backward(c["grad"].double(), c["rois"], 0.25, 7, 5, 2, 5, 13, 17, 0, True)


def test_opt_out_keeps_torchvision_kernel(torchvision_grads):
    """With D2SEG_TORCHVISION_ROI_ALIGN_BACKWARD=1, importing d2seg registers nothing."""
    assert torchvision_grads["active"] is False
    for a, b in zip(torchvision_grads["grads"], torchvision_grads["after_import"]):
        assert torch.equal(a, b)
