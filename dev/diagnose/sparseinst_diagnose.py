#!/usr/bin/env python
"""Why does a SparseInst model not classify? Diagnostics on a checkpoint (docs/sparseinst.md).

    # activation maps and matched predictions on shapes_val
    python dev/diagnose/sparseinst_diagnose.py maps CONFIG CHECKPOINT [KEY VALUE ...]
    # linear probe: are the features the classifier reads class-informative? (shapes_train)
    python dev/diagnose/sparseinst_diagnose.py probe CONFIG CHECKPOINT [KEY VALUE ...]
    # the same probe on features averaged inside each ground-truth mask (an oracle pooling);
    # also for Detectron2's R-CNNs (--feature p3, p4, ...)
    python dev/diagnose/sparseinst_diagnose.py probe --oracle [--feature NAME] CONFIG CHECKPOINT [KEY VALUE ...]

``maps`` prints, over the data set's images with every object Hungarian-matched to a
prediction as in training: the mean absolute correlation between the first group's
normalised activation maps of an image, the share of a matched map's mass inside its object
(and the objects' mean area), the class accuracy and class-probability entropy of the
matched predictions, and how many other predictions have dice > 0.5 with the object.
``probe`` fits a logistic regression (Adam, 500 steps) on 70 % of the matched objects'
features and prints its accuracy on the other 30 %.
"""
import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

import d2seg  # noqa: F401  (registers the methods and the shapes data sets)
from d2seg.engine import Trainer, setup_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetMapper, build_detection_test_loader


def load(config, checkpoint, opts, extra=()):
    cfg = setup_cfg(config, ["INPUT.MASK_FORMAT", "bitmask", *extra, *opts], freeze=True)
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(checkpoint)
    model.eval()
    return cfg, model


def batches(cfg, dataset, limit):
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[])  # keeps the instances, no flip
    for k, batch in enumerate(build_detection_test_loader(cfg, dataset, mapper=mapper)):
        if k >= limit:
            return
        yield batch


def sparseinst_pass(model, batch):
    """Decoder outputs, targets at the mask size and the matching of the image's objects."""
    images = model.preprocess_image(batch)
    out = model.predict(images.tensor)
    classes, masks = model.prepare_targets([b["instances"] for b in batch], images.tensor.shape[-2:],
                                           out["pred_masks"].shape[-2:])
    rows, cols = model.criterion.matcher(out["pred_logits"][0], out["pred_masks"][0].flatten(1), classes[0],
                                         masks[0].flatten(1), mask_hw=masks[0].shape[-2:])
    return images, out, classes[0], masks[0], rows, cols


@torch.no_grad()
def maps(args):
    cfg, model = load(args.config, args.checkpoint, args.opts, ["MODEL.SPARSE_INST.DECODER.OUTPUT_IAM", "True"])
    n = cfg.MODEL.SPARSE_INST.DECODER.NUM_MASKS
    corr, mass, area, acc, ent, dup = [], [], [], [], [], []
    for batch in batches(cfg, args.dataset, args.images):
        _, out, cls, tgt, rows, cols = sparseinst_pass(model, batch)
        a = out["pred_iam"][0].sigmoid().view(-1, n, *tgt.shape[-2:])[0].flatten(1)  # first group (N, P)
        a = a / a.sum(-1, keepdim=True)
        c = torch.corrcoef(a)
        corr.append(c[~torch.eye(n, dtype=torch.bool)].abs().mean().item())
        probs = out["pred_logits"][0].sigmoid()
        binary = out["pred_masks"][0].sigmoid() > 0.5
        for r, k in zip(rows.tolist(), cols.tolist()):
            obj = tgt[k] > 0.5
            mass.append(a[r][obj.flatten()].sum().item())
            area.append(obj.float().mean().item())
            acc.append(float(probs[r].argmax().item() == cls[k].item()))
            p = probs[r] / probs[r].sum()
            ent.append(-(p * p.clamp_min(1e-12).log()).sum().item())
            inter = (binary & obj).flatten(1).sum(1).float()
            dice = 2 * inter / (binary.flatten(1).sum(1) + obj.sum() + 1e-6)
            dup.append((dice > 0.5).sum().item() - int(dice[r] > 0.5))
    num_classes = cfg.MODEL.SPARSE_INST.DECODER.NUM_CLASSES
    print(f"{len(corr)} images, {len(acc)} matched objects")
    print(f"maps' mean abs. correlation        {np.mean(corr):.3f}")
    print(f"IAM mass inside its matched object {100 * np.mean(mass):.1f} % (objects' mean area {100 * np.mean(area):.1f} %)")
    print(f"class accuracy of matched preds    {100 * np.mean(acc):.0f} % (chance {100 / num_classes:.0f} %)")
    print(f"class-probability entropy          {np.mean(ent):.3f} (uniform {math.log(num_classes):.3f})")
    print(f"other predictions with dice > 0.5  {np.mean(dup):.2f} per object")


@torch.no_grad()
def features(args):
    cfg, model = load(args.config, args.checkpoint, args.opts)
    is_sparseinst = cfg.MODEL.META_ARCHITECTURE.endswith("SparseInst")
    if not is_sparseinst and not args.oracle:
        raise SystemExit(f"{cfg.MODEL.META_ARCHITECTURE}: only the --oracle probe applies (no matched predictions)")
    captured = {}
    if is_sparseinst and not args.oracle:
        branch = model.decoder.inst_branch
        if not hasattr(branch, "fc"):
            raise SystemExit("the probe reads Group-IAM's fc output; this decoder has none")
        branch.fc.register_forward_hook(lambda m, i, o: captured.__setitem__("z", F.relu(o)))
    xs, ys = [], []
    for batch in batches(cfg, args.dataset, args.images):
        inst = batch[0]["instances"]
        if len(inst) == 0:
            continue
        if is_sparseinst:
            images, _, cls, tgt, rows, cols = sparseinst_pass(model, batch)
            if not args.oracle:
                xs.append(captured["z"][0, rows])
                ys.append(cls[cols])
                continue
            feat = model.encoder(model.backbone(images.tensor))[0]
        else:
            images = model.preprocess_image(batch)
            feat = model.backbone(images.tensor)[args.feature][0]
        masks = inst.gt_masks.tensor.float()
        padded = masks.new_zeros(len(masks), *images.tensor.shape[-2:])
        padded[:, : masks.shape[1], : masks.shape[2]] = masks
        m = F.adaptive_avg_pool2d(padded[None], feat.shape[-2:])[0].flatten(1)  # (K, h*w)
        xs.append(m @ feat.flatten(1).t() / m.sum(1, keepdim=True).clamp(min=1e-6))
        ys.append(inst.gt_classes)
    x, y = torch.cat(xs), torch.cat(ys)
    fit = torch.arange(len(y)) < int(0.7 * len(y))
    x = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(500):
            opt.zero_grad()
            F.cross_entropy(probe(x[fit]), y[fit]).backward()
            opt.step()
    held = (probe(x[~fit]).argmax(-1) == y[~fit]).float().mean().item()
    train = (probe(x[fit]).argmax(-1) == y[fit]).float().mean().item()
    what = (f"{args.feature if not is_sparseinst else 'encoder output'} averaged inside each ground-truth mask"
            if args.oracle else "the classifier's input (relu(fc(z))) of the matched predictions")
    print(f"{len(y)} objects; features: {what}")
    print(f"linear probe accuracy: held out {100 * held:.0f} %, fitted {100 * train:.0f} % "
          f"(chance {100 / (int(y.max()) + 1):.0f} %)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["maps", "probe"])
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--oracle", action="store_true", help="probe: average features inside the ground-truth masks")
    parser.add_argument("--feature", default="p3", help="probe --oracle on an R-CNN: the FPN level")
    parser.add_argument("--dataset", default=None, help="default: shapes_val for maps, shapes_train for probe")
    parser.add_argument("--images", type=int, default=None, help="default: 100 for maps, 300 for probe")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args()
    if args.mode == "maps":
        args.dataset, args.images = args.dataset or "shapes_val", args.images or 100
        maps(args)
    else:
        args.dataset, args.images = args.dataset or "shapes_train", args.images or 300
        features(args)


if __name__ == "__main__":
    main()
