#!/usr/bin/env python
"""Build golden reference fixtures: run a reference implementation and record what it computes.

    python dev/reference/reference_fixtures.py --reference sparseinst \\
        --checkout /path/to/SparseInst --out tests/data/reference/

Given a local checkout of a reference repository, the family module of ``--reference``
builds the reference model (narrow widths, random init from ``--seed``, biased so that it
returns detections), runs a few small fixed images with ground truth, and this script writes
``<out>/<fixture name>.pt``: inputs, the reference's state dict, head outputs, final results
and training losses, with the reference's commit. The default-suite tests
(``tests/test_parity_*.py``) check d2seg against these files without the reference installed.

Families (one module each next to this file, imported only when asked for):

    sparseinst                       dev/reference/reference_sparseinst.py   hustvl/SparseInst
    pointrend-instance, -semantic    dev/reference/reference_pointrend.py    Detectron2 projects/PointRend
    adelaidet-*                      dev/reference/reference_adelaidet.py    aim-uofa/AdelaiDet
    condinst, blendmask              dev/reference/reference_condinst_blendmask.py   aim-uofa/AdelaiDet

The interface a family module implements, and the layout of a fixture, are in
:data:`FIXTURE_LAYOUT` below (and ``--list`` prints the available references).
"""
import argparse
import contextlib
import importlib
import os
import subprocess
import sys
from typing import Dict, List

import numpy as np
import torch

FORMAT_VERSION = 1
MAX_FIXTURE_BYTES = int(1.5 * 2**20)

# family prefix -> module (in dev/reference/, next to this file) that builds its fixtures
FAMILIES = {
    "sparseinst": "reference_sparseinst",
    "pointrend": "reference_pointrend",
    "adelaidet": "reference_adelaidet",
    "condinst": "reference_condinst_blendmask",
    "blendmask": "reference_condinst_blendmask",
}

FIXTURE_LAYOUT = """
A family module ``dev/reference/reference_<family>.py`` defines

    REFERENCES: Dict[str, str]
        reference name (what --reference takes, starting with the family prefix,
        e.g. "adelaidet-fcos") -> one line of description.
    build_fixture(name: str, checkout: str, seed: int) -> dict
        runs the reference at ``checkout`` and returns the fixture dict below
        (without "format", "commit", "reference", "torch": this script adds them).
    FIXTURE_FILE (optional): Dict[str, str], reference name -> file name
        (default: name with "-" -> "_" plus ".pt", e.g. "pointrend_instance.pt").

Fixture dict (torch.save'd; tensors on CPU, float32 unless said; keep it < 1.5 MB):

    "format": 1, "reference": name, "commit": git sha of the checkout,
    "repo": "owner/name", "torch": torch version used,
    "reference_config": the reference's config file the model was built from,
    "d2seg_config": the shipped d2seg config it corresponds to (path under configs/),
    "d2seg_opts": [KEY, VALUE, ...] the width overrides that narrow d2seg's model the same
        way (and nothing else: the shipped defaults must give parity),
    "seed": int,
    "notes": str, what the builder stubbed or patched in the reference (say why),
    "weights": the reference model's state dict, reference key names (convert it with
        d2seg.model_zoo.convert_state_dict in the test),
    "inputs": list of per-image dicts in Detectron2's input format:
        {"image": uint8 [3, H, W] (the channel order the config's INPUT.FORMAT says),
         "height": int, "width": int,
         "instances": {"gt_boxes": [N, 4] xyxy, "gt_classes": int64 [N],
                       "gt_masks": bool [N, H, W]}          (instance models)
         "sem_seg": int64 [H, W] (255 = ignore)               (semantic models)},
    "outputs": {
        "head": {name: tensor or list of tensors}  intermediate outputs in eval mode,
            names chosen by the family (document them in its test),
        "results": list per image of
            {"scores": [D], "pred_classes": int64 [D], "pred_boxes": [D, 4],
             "pred_masks": bool [D, h, w]}   (instances, at the input's height/width)
            or {"sem_seg_argmax": uint8 [H, W], "sem_seg_margin": [H, W] largest minus second
                logits per pixel}  (semantic: full logits would be too big)
    },
    "losses": {term name: 0-dim tensor}  training losses on the batch "inputs", reference
        names (the test maps them to d2seg's),
    "train_extra": {...} optional: whatever randomness control the test needs (e.g. the
        sampled point coordinates the reference drew), documented in the family test.
"""


def git_commit(checkout: str) -> str:
    """The commit of a checkout: ``git rev-parse HEAD``, else a REFERENCE_COMMIT file
    (write one when the checkout came from ``git archive``). A checkout without ``.git`` whose
    git directory lies elsewhere (a mirror): run with ``GIT_DIR=<that directory>``."""
    try:
        out = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    path = os.path.join(checkout, "REFERENCE_COMMIT")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    raise RuntimeError(f"{checkout}: not a git checkout and no REFERENCE_COMMIT file; "
                       "record the commit (git -C <mirror> rev-parse HEAD > REFERENCE_COMMIT)")


@contextlib.contextmanager
def on_path(*paths: str):
    """Put ``paths`` first on sys.path for the block (the reference's own packages)."""
    old = list(sys.path)
    sys.path[:0] = [os.path.abspath(p) for p in paths]
    try:
        yield
    finally:
        sys.path[:] = old


def seed_all(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    import random
    random.seed(seed)


def synthetic_images(seed: int, sizes=((96, 128), (112, 96)), max_objects: int = 4,
                     num_classes: int = 80, classes: List[int] = None) -> List[Dict]:
    """Small fixed images with ground truth: textured background, rectangles and ellipses
    in random colours (some partly hidden by later ones), a mask per visible object.

    Returns Detectron2-style dicts: "image" uint8 [3, H, W], "height", "width", and
    "instances" as plain tensors (see FIXTURE_LAYOUT)."""
    rng = np.random.RandomState(seed)
    out = []
    for (h, w) in sizes:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([60 + 40 * np.sin(xx / 7 + c) + 30 * np.cos(yy / 11 - c) for c in range(3)])
        img += rng.uniform(-10, 10, size=img.shape)
        masks, labels = [], []
        for k in range(rng.randint(2, max_objects + 1)):
            ch, cw = rng.randint(h // 5, h // 2), rng.randint(w // 5, w // 2)
            y0, x0 = rng.randint(0, h - ch), rng.randint(0, w - cw)
            if k % 2 == 0:
                m = np.zeros((h, w), bool)
                m[y0:y0 + ch, x0:x0 + cw] = True
            else:
                cy, cx = y0 + ch / 2, x0 + cw / 2
                m = ((yy - cy) / (ch / 2)) ** 2 + ((xx - cx) / (cw / 2)) ** 2 <= 1
            for prev in masks:
                prev &= ~m
            colour = rng.uniform(0, 255, size=3)
            img[:, m] = colour[:, None] + rng.uniform(-8, 8, size=(3, int(m.sum())))
            masks.append(m)
            labels.append(int(classes[k % len(classes)]) if classes else int(rng.randint(num_classes)))
        keep = [i for i, m in enumerate(masks) if m.sum() >= 16]
        masks = np.stack([masks[i] for i in keep])
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        out.append({
            "image": torch.from_numpy(np.clip(img, 0, 255).round().astype(np.uint8)),
            "height": h, "width": w,
            "instances": {"gt_boxes": torch.tensor(boxes, dtype=torch.float32),
                          "gt_classes": torch.tensor([labels[i] for i in keep], dtype=torch.int64),
                          "gt_masks": torch.from_numpy(masks)},
        })
    return out


def to_detectron2_inputs(inputs: List[Dict]) -> List[Dict]:
    """Fixture inputs -> Detectron2 model inputs (Instances / sem_seg), for either side."""
    from detectron2.structures import BitMasks, Boxes, Instances

    batch = []
    for d in inputs:
        x = {"image": d["image"].clone(), "height": d["height"], "width": d["width"]}
        if "instances" in d:
            g = d["instances"]
            inst = Instances((d["image"].shape[1], d["image"].shape[2]))
            inst.gt_boxes = Boxes(g["gt_boxes"].clone())
            inst.gt_classes = g["gt_classes"].clone()
            inst.gt_masks = BitMasks(g["gt_masks"].clone())
            x["instances"] = inst
        if "sem_seg" in d:
            x["sem_seg"] = d["sem_seg"].clone()
        batch.append(x)
    return batch


def instances_to_dict(inst) -> Dict[str, torch.Tensor]:
    """Detectron2 Instances (results) -> the fixture's plain result dict."""
    out = {"scores": inst.scores.detach().float().cpu(),
           "pred_classes": inst.pred_classes.detach().cpu().long()}
    if inst.has("pred_boxes"):
        out["pred_boxes"] = inst.pred_boxes.tensor.detach().float().cpu()
    if inst.has("pred_masks"):
        out["pred_masks"] = inst.pred_masks.detach().cpu().bool()
    return out


def family_of(name: str) -> str:
    fam = name.split("-", 1)[0]
    if fam not in FAMILIES:
        raise SystemExit(f"unknown reference {name!r}: families are {sorted(FAMILIES)}")
    return fam


def load_family(fam: str):
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(FAMILIES[fam])
    except ModuleNotFoundError as e:
        if e.name == FAMILIES[fam]:
            raise SystemExit(f"dev/reference/{FAMILIES[fam]}.py does not exist yet: no builder for the "
                             f"{fam} references") from None
        raise


def fixture_file(module, name: str) -> str:
    return getattr(module, "FIXTURE_FILE", {}).get(name, name.replace("-", "_") + ".pt")


def shrink(obj):
    """Store float64 as float32 and make tensors contiguous own storage (small files)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.float64:
            t = t.float()
        return t.clone().contiguous()
    if isinstance(obj, dict):
        return {k: shrink(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(shrink(v) for v in obj)
    return obj


def build(name: str, checkout: str, out_dir: str, seed: int = 0) -> str:
    module = load_family(family_of(name))
    if name not in module.REFERENCES:
        raise SystemExit(f"unknown reference {name!r}; {module.__name__} has {sorted(module.REFERENCES)}")
    commit = git_commit(checkout)
    fixture = module.build_fixture(name, checkout, seed)
    fixture = shrink(fixture)
    fixture.update({"format": FORMAT_VERSION, "reference": name, "commit": commit,
                    "torch": torch.__version__})
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, fixture_file(module, name))
    torch.save(fixture, path + ".tmp")
    os.replace(path + ".tmp", path)
    size = os.path.getsize(path)
    print(f"{name}: {fixture.get('repo', '?')}@{commit[:12]} -> {path} ({size / 1024:.0f} KiB)")
    if size > MAX_FIXTURE_BYTES:
        print(f"warning: {path} is over {MAX_FIXTURE_BYTES / 2**20:.1f} MiB; narrow the model",
              file=sys.stderr)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="e.g. sparseinst, pointrend-instance, adelaidet-fcos")
    p.add_argument("--checkout", help="local checkout of the reference repository")
    p.add_argument("--out", default="tests/data/reference/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the references and exit")
    args = p.parse_args(argv)
    if args.list:
        listed = set()
        for fam in FAMILIES:
            if FAMILIES[fam] in listed:  # one module can serve several prefixes
                continue
            listed.add(FAMILIES[fam])
            try:
                module = load_family(fam)
            except SystemExit as e:
                print(f"{fam}-*: {e}")
                continue
            for name, desc in module.REFERENCES.items():
                print(f"{name:28s} {desc}")
        return 0
    if not (args.reference and args.checkout):
        p.error("--reference and --checkout are required")
    torch.set_num_threads(1)
    build(args.reference, args.checkout, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
