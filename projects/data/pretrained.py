"""A backbone pretrained on the shapes world: ``d2seg://shapes/R18-GN-pretrained``.

Every paper in this collection fine-tunes from an ImageNet-pretrained backbone; none exists
here. This module makes its stand-in: the shapes configs' ResNet-18-GN (``MODEL.RESNETS`` of
configs/Base-Shapes.yaml, no FPN), trained as a classifier of single-shape crops cut from
freshly rendered shapes images (seed 1000 by default: neither ``shapes_train`` (seed 0) nor
``shapes_val`` (seed 1)). Like the data set, it is made on first use, deterministically from
its recipe, and cached under ``$DETECTRON2_DATASETS/shapes_pretrained/``.

The checkpoint is a Detectron2 checkpoint of the bare ResNet (``stem.conv1.weight``,
``res2.0.conv1.norm.weight``, ...) with ``matching_heuristics`` set, as Detectron2's own
ImageNet checkpoints are loaded: the keys match the backbone's by suffix, whether the
ResNet sits under ``backbone.bottom_up`` (FPN configs) or ``backbone`` (SparseInst). Only
backbone keys are loaded; FPN and heads keep their initialisation.

Shape shorthand: N: crops, C: crop side in pixels.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import time

import cv2
import numpy as np
import torch
from torch import nn

from .shapes import SHAPES_CLASSES, _write_atomically, datasets_root, render_image

logger = logging.getLogger(__name__)

PREFIX = "shapes/"


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    """Everything that decides the pretrained weights (its digest names the cached file)."""

    seed: int = 1000  # rendering seed of the source images (not shapes_train/val's 0 / 1)
    num_images: int = 3000
    image_size: int = 128
    crop_size: int = 64
    margin: float = 0.15  # added around the visible box, per side, relative to its side
    num_held_out: int = 1000  # the first crops, never trained on
    iters: int = 1200
    batch_size: int = 64
    max_lr: float = 0.1  # one-cycle: warm-up over the first 30 %, cosine down to 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    train_seed: int = 0  # order of batches, flips, initialisation

    def digest(self):
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# Named recipes that ``d2seg://shapes/<name>`` can fetch.
RECIPES = {"R18-GN-pretrained": PretrainRecipe()}


# ----------------------------------------------------------------------------------------
# The classification data: one crop per annotated instance
# ----------------------------------------------------------------------------------------
def crop_instance(image, mask, crop_size, margin):
    """A square crop around the visible part of one instance.

    Args:
        image: (S, S, 3) uint8.
        mask: (S, S) bool, the instance's visible pixels.
    Returns:
        (C, C, 3) uint8: the visible box plus ``margin`` per side, made square about its
        centre, reflect-padded where it leaves the image, resized to ``crop_size``.
    """
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    half = max(int(math.ceil(side / 2.0)), 2)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    pad = half + 1
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    patch = padded[cy - half + pad: cy + half + pad, cx - half + pad: cx + half + pad]
    return cv2.resize(patch, (crop_size, crop_size), interpolation=cv2.INTER_AREA)


def make_crops(recipe):
    """All crops of the recipe's images.

    Returns:
        crops: (N, C, C, 3) uint8 in BGR (Detectron2's input format of the shapes configs).
        labels: (N,) int64 class indices into SHAPES_CLASSES.
    """
    crops, labels = [], []
    for i in range(recipe.num_images):
        image, instances = render_image(recipe.seed, i, recipe.image_size)
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        for inst in instances:
            crops.append(crop_instance(bgr, inst.visible, recipe.crop_size, recipe.margin))
            labels.append(inst.category)
    if len(crops) <= recipe.num_held_out:
        raise ValueError(f"{len(crops)} crops from {recipe.num_images} images: not more than the "
                         f"{recipe.num_held_out} held out; render more images")
    return np.stack(crops), np.asarray(labels, np.int64)


# ----------------------------------------------------------------------------------------
# The classifier: the shapes configs' ResNet, global average pooling, one linear layer
# ----------------------------------------------------------------------------------------
def shapes_backbone_cfg():
    """The configuration of the shapes configs' ResNet (configs/Base-Shapes.yaml's
    MODEL.RESNETS and pixel statistics), with res5 as its only output."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


class CropClassifier(nn.Module):
    """ResNet -> global average pool -> linear. ``resnet`` keeps Detectron2's key names."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone import build_resnet_backbone

        self.resnet = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        channels = self.resnet.output_shape()["res5"].channels
        self.linear = nn.Linear(channels, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1), False)

    def forward(self, images):
        """images: (B, 3, C, C) float BGR 0-255 -> (B, num_classes) logits."""
        x = (images - self.pixel_mean) / self.pixel_std
        return self.linear(self.resnet(x)["res5"].mean(dim=(2, 3)))


def _one_cycle_lr(it, total, max_lr):
    warm = max(int(0.3 * total), 1)
    if it < warm:
        return max_lr * (0.04 + 0.96 * it / warm)
    t = (it - warm) / max(total - warm, 1)
    return max_lr * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def _accuracy(model, crops, labels, batch_size=256):
    model.eval()
    correct = 0
    for s in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[s: s + batch_size]).permute(0, 3, 1, 2).float()
        correct += int((model(x).argmax(1) == torch.from_numpy(labels[s: s + batch_size])).sum())
    model.train()
    return correct / max(len(crops), 1)


def pretrain_backbone(recipe, log_period=100):
    """Train the crop classifier of ``recipe``.

    Returns:
        (state_dict of the bare ResNet, dict of statistics: held-out and train accuracy,
        number of crops, seconds).
    """
    start = time.perf_counter()
    crops, labels = make_crops(recipe)
    held_x, held_y = crops[: recipe.num_held_out], labels[: recipe.num_held_out]
    train_x, train_y = crops[recipe.num_held_out:], labels[recipe.num_held_out:]
    logger.info(f"Pretraining the shapes backbone on {len(train_x)} crops ({len(held_x)} held out) "
                f"of {recipe.num_images} images rendered with seed {recipe.seed}: "
                f"{recipe.iters} iterations x {recipe.batch_size}")

    torch.manual_seed(recipe.train_seed)
    rng = np.random.default_rng(recipe.train_seed)
    model = CropClassifier(shapes_backbone_cfg(), len(SHAPES_CLASSES))
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.max_lr, momentum=recipe.momentum,
    )
    order = rng.permutation(len(train_x))
    cursor = 0
    running = None
    for it in range(recipe.iters):
        if cursor + recipe.batch_size > len(order):
            order, cursor = rng.permutation(len(train_x)), 0
        idx = order[cursor: cursor + recipe.batch_size]
        cursor += recipe.batch_size
        x = torch.from_numpy(train_x[idx]).permute(0, 3, 1, 2).float()
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        x[flip] = x[flip].flip(-1)
        y = torch.from_numpy(train_y[idx])
        for group in optimizer.param_groups:
            group["lr"] = _one_cycle_lr(it, recipe.iters, recipe.max_lr)
        loss = nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining diverged at iteration {it} (loss {loss.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (it + 1) % log_period == 0 or it + 1 == recipe.iters:
            logger.info(f"pretrain iter {it + 1}/{recipe.iters}: loss {running:.3f}, "
                        f"lr {optimizer.param_groups[0]['lr']:.4f}, {time.perf_counter() - start:.0f} s")
    stats = {
        "held_out_accuracy": _accuracy(model, held_x, held_y),
        "train_accuracy": _accuracy(model, train_x[:2000], train_y[:2000]),
        "chance": 1.0 / len(SHAPES_CLASSES),
        "num_train_crops": int(len(train_x)),
        "num_held_out_crops": int(len(held_x)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    logger.info(f"Pretrained shapes backbone: held-out accuracy {100 * stats['held_out_accuracy']:.1f} % "
                f"(chance {100 * stats['chance']:.0f} %), train accuracy {100 * stats['train_accuracy']:.1f} %, "
                f"{stats['seconds']:.0f} s")
    state = {k: v.detach().clone() for k, v in model.resnet.state_dict().items()}
    return state, stats


def save_checkpoint(path, state, recipe, stats):
    """Write ``path`` as a Detectron2 checkpoint loaded by suffix matching."""
    data = {
        "model": state,
        "matching_heuristics": True,
        "__author__": "d2seg shapes pretraining",
        "recipe": dataclasses.asdict(recipe),
        "stats": stats,
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(data, tmp)
    os.replace(tmp, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"recipe": dataclasses.asdict(recipe), "stats": stats}, f, indent=1)


def cached_path(name, recipe=None, root=None):
    """Where the checkpoint of ``name`` (made with ``recipe``, default: RECIPES[name]) lives."""
    recipe = RECIPES[name] if recipe is None else recipe
    root = datasets_root() if root is None else os.fspath(root)
    folder = os.path.join(root, "shapes_pretrained", f"{name}-{recipe.digest()}")
    return os.path.join(folder, "model_final.pth")


def ensure_pretrained(name, recipe=None, root=None):
    """The local checkpoint of ``name``, made (minutes) if it is not cached yet."""
    if name not in RECIPES and recipe is None:
        raise KeyError(f"d2seg://{PREFIX}{name}: unknown pretrained backbone; known: "
                       + ", ".join(f"{PREFIX}{k}" for k in sorted(RECIPES)))
    recipe = RECIPES[name] if recipe is None else recipe
    path = cached_path(name, recipe, root)
    folder = os.path.dirname(path)

    def write(out):
        logger.info(f"{PREFIX}{name} is not cached: pretraining it now (about 15 min on one core; "
                    "done once, then cached)")
        state, stats = pretrain_backbone(recipe)
        save_checkpoint(os.path.join(out, os.path.basename(path)), state, recipe, stats)

    _write_atomically(folder, path, write, f"the pretrained backbone {PREFIX}{name}")
    return path


def resolve_pretrained(name):
    """``d2seg://shapes/<name>`` (or ``shapes/<name>``) -> the local checkpoint path, pretrained
    now if it is not cached yet, unless the environment says ``D2SEG_PRETRAIN_ON_FIRST_USE=0``
    (the test suite does: an uncached name is then an error, not 15 minutes of pretraining)."""
    if name.startswith("d2seg://"):
        name = name[len("d2seg://"):]
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    if os.environ.get("D2SEG_PRETRAIN_ON_FIRST_USE", "1") == "0" and name in RECIPES \
            and not os.path.isfile(cached_path(name)):
        raise RuntimeError(
            f"d2seg://{PREFIX}{name} is not cached under {os.path.dirname(os.path.dirname(cached_path(name)))} "
            "and D2SEG_PRETRAIN_ON_FIRST_USE=0 forbids making it now: make it with "
            "`python tools/pretrain_backbone.py`, or train from scratch with MODEL.WEIGHTS \"\"")
    return ensure_pretrained(name)
