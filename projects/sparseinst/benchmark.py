"""CPU (or GPU) inference timing for SparseInst against Detectron2's Mask R-CNN, and the
kernel x mask-feature product with bmm against d2seg.layers' dynamic_kernel_product.

    python -m d2seg.sparseinst.benchmark [--size 640] [--iters 5] [--threads N]

Both detectors are built from their R-50 configs with random weights (nothing to download
here), on one 640 x 640 image (shorter side 640), batch 1, after one warm-up pass. Mask
R-CNN runs with SCORE_THRESH_TEST 0 and NMS_THRESH_TEST 1 so it always runs its mask head
on and post-processes 100 detections, as many masks as SparseInst's N = 100 (its cost
depends on the number of detections; random weights would otherwise give an arbitrary
count, e.g. 2 after NMS). Times include pre- and post-processing
(mask pasting / upsampling to the image) but not data loading. Besides wall time the
process CPU time is printed: on a shared machine it is the steadier number, and with
``--threads 1`` it is the single-core inference time.
"""
import argparse
import os
import time

import torch

import d2seg  # noqa: F401
from d2seg.config import get_d2seg_cfg
from detectron2.modeling import build_model

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIGS = os.path.join(_HERE, "..", "..", "configs")


def sparseinst_cfg(config="SparseInst/sparse_inst_r50_giam.yaml"):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(os.path.join(_CONFIGS, config))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def mask_rcnn_cfg():
    from detectron2 import model_zoo

    cfg = get_d2seg_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 1.0  # random weights give near-identical boxes: keep them
    return cfg


@torch.no_grad()
def time_model(cfg, size, iters, device):
    cfg.MODEL.DEVICE = device
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8).float()
    inputs = [{"image": image.to(device), "height": size, "width": size}]
    out = model(inputs)  # warm-up
    times, cpu_times = [], []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        out = model(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    times.sort()
    cpu_times.sort()
    return times[len(times) // 2], cpu_times[len(times) // 2], len(out[0]["instances"])


@torch.no_grad()
def time_kernel_product(iters=20, b=1, n=100, d=128, h=160, w=160):
    """Median seconds of bmm and of dynamic_kernel_product for SparseInst's shapes."""
    from d2seg.layers.dynamic_conv import dynamic_kernel_product

    kernels = torch.randn(b, n, d)
    feats = torch.randn(b, d, h, w)
    im_inds = torch.arange(b).repeat_interleave(n)
    res = {}
    for name, fn in {
        "bmm": lambda: torch.bmm(kernels, feats.flatten(2)),
        "dynamic_kernel_product": lambda: dynamic_kernel_product(kernels.reshape(b * n, d), feats, im_inds),
    }.items():
        fn()
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        res[name] = sorted(ts)[iters // 2]
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-kernel-product", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"image {args.size}x{args.size}, median of {args.iters}")
    for name, cfg in [("SparseInst R-50 G-IAM", sparseinst_cfg()),
                      ("SparseInst R-50 IAM", sparseinst_cfg("SparseInst/sparse_inst_r50_base.yaml")),
                      ("Mask R-CNN R-50-FPN", mask_rcnn_cfg())]:
        sec, cpu, ndet = time_model(cfg, args.size, args.iters, args.device)
        print(f"{name:24s} wall {sec * 1000:8.1f} ms/image, process CPU {cpu * 1000:8.1f} ms/image "
              f"({ndet} detections)")
    if not args.skip_kernel_product:
        for k, v in time_kernel_product().items():
            print(f"kernel product {k:24s} {v * 1000:8.2f} ms (B=1, N=100, D=128, 160x160)")


if __name__ == "__main__":
    main()
