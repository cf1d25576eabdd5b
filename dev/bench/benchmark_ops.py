#!/usr/bin/env python
"""Speed and peak memory of d2seg's compiled ops against the pure-PyTorch composites
people would otherwise write, at realistic sizes, forward and forward+backward.

    python dev/bench/benchmark_ops.py                 # CPU, 2 threads
    python dev/bench/benchmark_ops.py --device cuda   # on a GPU
    python dev/bench/benchmark_ops.py --device cuda --dtype float32,float16 --json ops.json

Each case runs the compiled op and the composite alternately (--repeat times each) on the
same inputs; a time is the fastest run (wall clock), "cpu" the process CPU time of that
kind of run divided by the threads (a check on a busy machine, where wall clock also
counts waiting for a core). "forward+backward" is one forward and one
torch.autograd.grad; the output gradient (ones) is made once per case, outside the
timing and the memory count, as the next layer would hand it over. Peak memory is the
largest amount of memory allocated during one call and still held at some instant
(outputs included; inputs excluded), from the PyTorch profiler on CPU and
torch.cuda.max_memory_allocated on CUDA.
Prints a Markdown table per dtype (--dtype; float16 / bfloat16 inputs run the compiled ops'
float32 arithmetic and the composites in that dtype, on a GPU); ratios are composite /
compiled (> 1: the compiled op wins). --json also writes every row as JSON.

On a CPU, fresh output tensors cost page faults (each 4 KiB page is zeroed by the kernel
on first touch), which both sides pay; PyTorch's THP_MEM_ALLOC_ENABLE=1 (set in the
environment before the run) backs large allocations with 2 MiB pages instead, which
leaves mostly the computation to compare.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from d2seg.layers import dynamic_conv as dc
from d2seg.layers import point_features as pf
from d2seg.layers.extension import extension_available, load_extension


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn, device):
    """Peak bytes allocated during fn() (and still live at that instant)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every allocation (+) and free (-) of PyTorch's CPU allocator, in time order
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, nbytes in records:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def timed(fn, device):
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def compare(fn_a, fn_b, device, repeat):
    """Fastest wall time and matching CPU time of fn_a and fn_b, run alternately."""
    fn_a(), fn_b()  # warm-up
    best = [(float("inf"), 0.0), (float("inf"), 0.0)]
    for _ in range(repeat):
        for i, fn in enumerate((fn_a, fn_b)):
            w, c = timed(fn, device)
            if w < best[i][0]:
                best[i] = (w, c)
    return best


def forward_backward(fn, inputs, grad):
    def run():
        out = fn()
        return torch.autograd.grad(out, inputs, grad)

    return run


def cases(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(device)

    # PointINS: R=128 instances, E=9 templates of 16x16, B=256 outputs, d=1 (paper) and 3.
    for d in (1, 3):
        x, w, b = rnd(128, 9, 16, 16), rnd(128, 256, 9, d, d, scale=0.3), rnd(128, 256)
        yield (
            f"instance_aware_conv (PointINS) R=128 E=9 K=16 B=256 d={d}",
            "grouped F.conv2d",
            dc.instance_aware_conv,
            dc.instance_aware_conv_reference,
            [x, w, b],
        )
    # CondInst: R=100 instances over 2 images of 8 x 100 x 136 mask features (stride 8 of
    # 800 x 1088), relative coordinates, 3 layers of 8 channels (169 parameters).
    feats = rnd(2, 8, 100, 136)
    inds = torch.randint(0, 2, (100,), generator=g).to(device)
    params = rnd(100, 169, scale=0.3)
    locs = (torch.rand(100, 2, generator=g, dtype=dtype) * torch.tensor([1088.0, 800.0], dtype=dtype)).to(device)
    scales = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0], dtype=dtype)[torch.randint(0, 5, (100,), generator=g)].to(device)
    kw = dict(instance_locations=locs, scales=scales, mask_feat_stride=8)
    yield (
        "dynamic_mask_head (CondInst) R=100 C=8 100x136, 169 params",
        "gather + cat + 3 grouped F.conv2d",
        lambda f, p: dc.dynamic_mask_head(f, inds, p, **kw),
        lambda f, p: dc.dynamic_mask_head_reference(f, inds, p, **kw),
        [feats, params],
    )
    # PointRend: R=100 boxes x 28^2 points x 256 channels from the stride-4 map (200 x 272)
    # of one 800 x 1088 image; training-like uniform points inside each box.
    p2 = rnd(1, 256, 200, 272)
    xy = torch.rand(100, 2, generator=g, dtype=dtype) * torch.tensor([900.0, 650.0], dtype=dtype)
    wh = torch.rand(100, 2, generator=g, dtype=dtype) * 300 + 20
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([1088.0, 800.0], dtype=dtype))], 1).to(device)
    bi = torch.zeros(100, dtype=torch.int64, device=device)
    pts = torch.rand(100, 784, 2, generator=g, dtype=dtype).to(device)
    yield (
        "point_sample_boxes (PointRend) R=100 P=784 C=256, 200x272",
        "per-image F.grid_sample (Detectron2)",
        lambda f: pf.point_sample_boxes([f], boxes, bi, pts, [0.25]),
        lambda f: pf.point_sample_boxes_reference([f], boxes, bi, pts, [0.25]),
        [p2],
    )
    # the same points, image-normalised, through point_sample vs F.grid_sample
    img_pts = torch.stack(
        [
            (pts[..., 0] * (boxes[:, None, 2] - boxes[:, None, 0]) + boxes[:, None, 0]) / 1088.0,
            (pts[..., 1] * (boxes[:, None, 3] - boxes[:, None, 1]) + boxes[:, None, 1]) / 800.0,
        ],
        dim=-1,
    ).reshape(1, -1, 2)
    yield (
        "point_sample 1x256x200x272, 78400 points",
        "F.grid_sample",
        lambda f: pf.point_sample(f, img_pts),
        lambda f: pf.point_sample_reference(f, img_pts, align_corners=False),
        [p2],
    )


def fmt_ms(s):
    return f"{s * 1000:.1f}"


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--dtype", default="float32",
                        help="comma-separated dtypes, one table each: float32, float64, float16, bfloat16 (default float32)")
    parser.add_argument("--json", default="", metavar="PATH", help="also write every row (and the set-up) to this JSON file")
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        parser.error(f"--dtype: unknown {bad or args.dtype!r}; choose from {', '.join(DTYPES)}")
    if not extension_available():
        raise SystemExit("d2seg._C is not built: the benchmark would compare the references with themselves")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        if not load_extension().has_cuda():
            parser.error("--device cuda: d2seg._C was built without CUDA kernels (rebuild with FORCE_CUDA=1 make build)")
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    where = f"device {device}"
    if device.type == "cuda":
        where += (f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}; composites with "
                  f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                  f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32})")
    setup = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}, "
        f"THP_MEM_ALLOC_ENABLE={thp}, load average at start {os.getloadavg()[0]:.2f}"
    )
    print(setup + "\n")
    rows = []
    for dtype_name in dtypes:
        if len(dtypes) > 1 or dtype_name != "float32":
            print(f"\n{dtype_name}:\n")
        print("| op | pass | compiled ms | composite ms | speed-up | compiled peak MiB | composite peak MiB | memory ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for name, composite, ours, ref, inputs in cases(device, DTYPES[dtype_name]):
            if args.only and args.only not in name:
                continue
            for mode in ("forward", "forward+backward"):
                if mode == "forward":
                    fa, fb = (lambda: ours(*inputs)), (lambda: ref(*inputs))
                    with torch.no_grad():
                        (ta, ca), (tb, cb) = compare(fa, fb, device, args.repeat)
                        ma, mb = peak_memory(fa, device), peak_memory(fb, device)
                elif (device.type == "cpu" and DTYPES[dtype_name] in (torch.float16, torch.bfloat16)
                      and "grid_sample" in composite):
                    # PyTorch 2.14's CPU F.grid_sample backward in float16/bfloat16 crashes the
                    # process (segfault) at these sizes (256 channels on 200 x 272, reproduced
                    # without d2seg): nothing to compare against
                    why = "not run: F.grid_sample's half-precision CPU backward segfaults (PyTorch 2.14)"
                    print(f"| {name} | {mode} | - | {why} | - | - | - | - |", flush=True)
                    rows.append(dict(op=name, dtype=dtype_name, mode=mode, composite=composite, skipped=why))
                    continue
                else:
                    req = [t.detach().requires_grad_() for t in inputs]
                    with torch.no_grad():
                        grad = torch.ones_like(ours(*inputs))
                    fa = forward_backward(lambda: ours(*req), req, grad)
                    fb = forward_backward(lambda: ref(*req), req, grad)
                    (ta, ca), (tb, cb) = compare(fa, fb, device, args.repeat)
                    ma, mb = peak_memory(fa, device), peak_memory(fb, device)
                print(
                    f"| {name} | {mode} | {fmt_ms(ta)} (cpu {fmt_ms(ca / args.threads)}) | {fmt_ms(tb)} (cpu {fmt_ms(cb / args.threads)}) "
                    f"| {tb / ta:.2f}x | {ma / 2**20:.1f} | {mb / 2**20:.1f} | {ma / max(mb, 1):.3f} |",
                    flush=True,
                )
                rows.append(dict(op=name, dtype=dtype_name, mode=mode, composite=composite,
                                 compiled_ms=ta * 1000, composite_ms=tb * 1000, speedup=tb / ta,
                                 compiled_peak_mib=ma / 2**20, composite_peak_mib=mb / 2**20,
                                 memory_ratio=ma / max(mb, 1)))
            print(f"| ↳ composite: {composite} | | | | | | | |")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "device": str(device), "repeat": args.repeat, "threads": args.threads,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
