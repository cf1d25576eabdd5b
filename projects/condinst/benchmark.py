"""Time CondInst's dynamic mask head: the fused op ``d2seg.layers.dynamic_mask_head``
against the grouped-conv composite (AdelaiDet's way, ``dynamic_mask_head_reference``) on
the same inputs, forward only (inference) and forward + backward (training).

    python -m d2seg.condinst.benchmark [--instances 100] [--height 100] [--width 136]

Default sizes: 100 instances on the 1/8 mask features of an 800 x 1088 COCO input
(the paper's "about 5 ms for 100 instances" is on a GPU, at this size)."""
import argparse
import time

import torch

from d2seg.layers import dynamic_mask_head, extension_available
from d2seg.layers.dynamic_conv import dynamic_mask_head_reference


def _time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), sorted(ts)[len(ts) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--height", type=int, default=100)
    p.add_argument("--width", type=int, default=136)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    R, H, W = a.instances, a.height, a.width
    feats = torch.randn(1, 8, H, W)
    params = torch.randn(R, 169) * 0.1
    locs = torch.rand(R, 2) * torch.tensor([W * 8.0, H * 8.0])
    scales = torch.full((R,), 64.0)
    im_inds = torch.zeros(R, dtype=torch.long)
    args = (feats, im_inds, params, 8, 3, locs, 8, scales)
    out_f = dynamic_mask_head(*args)
    out_r = dynamic_mask_head_reference(*args)
    err = (out_f - out_r).abs().max().item()
    print(f"compiled extension: {extension_available()}, torch threads: {torch.get_num_threads()}")
    print(f"R={R} instances on (1, 8, {H}, {W}) mask features; max |fused - composite| = {err:.2e}")
    with torch.no_grad():
        f = _time(lambda: dynamic_mask_head(*args), a.repeats)
        r = _time(lambda: dynamic_mask_head_reference(*args), a.repeats)
    print(f"forward   fused {f[0]*1e3:8.1f} ms (median {f[1]*1e3:.1f})   composite {r[0]*1e3:8.1f} ms "
          f"(median {r[1]*1e3:.1f})   composite/fused {r[0]/f[0]:.2f}x")
    fp, pp = feats.clone().requires_grad_(), params.clone().requires_grad_()
    g = torch.randn(R, 1, H, W)

    def train(fn):
        def step():
            out = fn(fp, im_inds, pp, 8, 3, locs, 8, scales)
            out.backward(g)
        return step

    f = _time(train(dynamic_mask_head), a.repeats)
    r = _time(train(dynamic_mask_head_reference), a.repeats)
    print(f"fwd+bwd   fused {f[0]*1e3:8.1f} ms (median {f[1]*1e3:.1f})   composite {r[0]*1e3:8.1f} ms "
          f"(median {r[1]*1e3:.1f})   composite/fused {r[0]/f[0]:.2f}x")


if __name__ == "__main__":
    main()
