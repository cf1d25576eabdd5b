#!/usr/bin/env python
"""Learn MEInst's linear mask encoding from a data set registered in Detectron2, save it
(.npz) and report the reconstruction mIoU for several numbers of components (the
upper-bound analysis of the paper's Fig. 5) as a table and a PNG plot.

    # the built-in shapes (generated on first use), paper defaults m=28, N=60
    python tools/meinst_encoding.py --dataset shapes_train --output datasets/meinst/shapes.npz
    # what a config uses (its MODEL.MEINST.* and D2SEG.SHAPES.*, its first train set)
    python tools/meinst_encoding.py --config-file configs/MEInst/MEInst_R_50_1x.yaml \
        --output datasets/coco/components/coco_2017_train_m28_n60.npz
    # a user's COCO-format data set
    python tools/meinst_encoding.py --coco-json ann.json --image-root imgs/ --output my.npz

The data set is read one image at a time; memory is O((m*m)^2) whatever its size.
Two passes: one for the statistics, one for the reconstruction mIoU (--no-eval skips it).
"""
import argparse
import json
import logging
import os
import sys
import time

import d2seg  # noqa: F401  (registers the built-in data sets and the config keys)
from d2seg.meinst import MaskStatistics, reconstruction_miou, save_encoding
from d2seg.meinst.learn import iter_dataset_masks

DEFAULT_EVAL_DIMS = (5, 10, 20, 30, 40, 60, 80, 100, 150, 200)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", help="take m, N, flags, data set from this config")
    p.add_argument("--dataset", default="", help="registered data set name (default: config's)")
    p.add_argument("--coco-json", default="", help="register this COCO json as the data set")
    p.add_argument("--image-root", default="", help="image folder of --coco-json")
    p.add_argument("--mask-size", type=int, default=None, help="m (default 28 or the config's)")
    p.add_argument("--num-components", type=int, default=None, help="N kept (default 60 or the config's)")
    p.add_argument("--whiten", dest="whiten", action="store_true", default=None)
    p.add_argument("--no-whiten", dest="whiten", action="store_false")
    p.add_argument("--sigmoid", dest="sigmoid", action="store_true", default=None)
    p.add_argument("--no-sigmoid", dest="sigmoid", action="store_false")
    p.add_argument("--eval-dims", default=",".join(map(str, DEFAULT_EVAL_DIMS)),
                   help="comma-separated N for the reconstruction table")
    p.add_argument("--no-eval", action="store_true", help="skip the reconstruction pass")
    p.add_argument("--max-masks", type=int, default=None, help="use only the first masks")
    p.add_argument("--output", required=True, help="encoding file (.npz)")
    p.add_argument("--plot", default=None, help="PNG of mIoU vs N (default: <output>_miou.png)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def resolve(args):
    """(dataset name, m, N, whiten, sigmoid) from the arguments and the optional config."""
    from d2seg.config import get_d2seg_cfg

    cfg = get_d2seg_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    mc = cfg.MODEL.MEINST
    if args.coco_json:
        from d2seg.data import register_coco_dataset

        name = args.dataset or "meinst_encoding_source"
        register_coco_dataset(name, args.coco_json, args.image_root)
    else:
        name = args.dataset or mc.ENCODING_DATASET or (cfg.DATASETS.TRAIN[0] if args.config_file else "")
        if not name:
            raise SystemExit("give --dataset, --coco-json or --config-file")
        from d2seg.data import prepare_datasets

        cfg.defrost()
        cfg.DATASETS.TRAIN = (name,)
        prepare_datasets(cfg)  # the built-in shapes with the config's parameters
    m = args.mask_size or mc.MASK_SIZE
    n = args.num_components or mc.DIM_MASK
    whiten = mc.WHITEN if args.whiten is None else args.whiten
    sigmoid = mc.SIGMOID if args.sigmoid is None else args.sigmoid
    return name, m, n, whiten, sigmoid


def plot(path, table, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted(table)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(dims, [100 * table[d] for d in dims], "o-")
    ax.plot(dims, [100 * (1 - table[d]) for d in dims], "s--", label="1 - mIoU")
    ax.set_xlabel("number of components N")
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(["mIoU", "1 - mIoU (reconstruction error)"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    name, m, n, whiten, sigmoid = resolve(args)
    t0 = time.time()
    stats = MaskStatistics(m, sigmoid)
    for batch in iter_dataset_masks(name, m, max_masks=args.max_masks):
        stats.update(batch)
    params = stats.fit(n, whiten, dataset=name)
    save_encoding(args.output, params)
    print(f"{name}: {stats.count} masks, m={m}, N={n}, whiten={whiten}, sigmoid={sigmoid} "
          f"-> {args.output} ({time.time() - t0:.1f} s)")
    if args.no_eval:
        return 0
    dims = sorted({int(d) for d in args.eval_dims.split(",") if d.strip()} | {n})
    dims = [d for d in dims if 1 <= d <= m * m]
    table = reconstruction_miou(name, [stats.fit(d, whiten, name) for d in dims], max_masks=args.max_masks)
    evr = stats.fit(m * m, whiten)
    total_var = max(evr.explained_variance.sum(), 1e-12)
    lines = ["| N | explained variance | reconstruction mIoU | 1 - mIoU |", "|---|---|---|---|"]
    for d in dims:
        ev = evr.explained_variance[:d].sum() / total_var
        lines.append(f"| {d} | {100 * ev:.1f}% | {100 * table[d]:.2f} | {100 * (1 - table[d]):.2f} |")
    text = "\n".join(lines)
    print(text)
    stem = os.path.splitext(args.output)[0]
    with open(stem + "_miou.json", "w") as f:
        json.dump({"dataset": name, "mask_size": m, "num_masks": stats.count,
                   "miou": {str(d): table[d] for d in dims}}, f, indent=1)
    png = args.plot or stem + "_miou.png"
    plot(png, table, f"{name}: {stats.count} masks, {m}x{m}")
    print(f"table: {stem}_miou.json, plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
