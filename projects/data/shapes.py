"""The built-in synthetic data set `shapes`: rendering and writing it as COCO files.

Each image is a textured background (colour gradient, low-frequency colour blobs,
optional stripes, clutter lines, noise) with 0-6 instances of five classes painted on it
in order, so later instances occlude earlier ones. The annotation of an instance is its
VISIBLE part, exact per pixel (the painted pixels that no later instance covered).

Everything is a function of ``(seed, image index, image_size)``: image ``i`` is drawn with
``numpy.random.default_rng([seed, i])``, so a data set is reproducible byte for byte.

Shape shorthand: S: image side in pixels (images are S x S), K: instances in one image.
"""
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import cv2
import numpy as np
import pycocotools.mask as mask_util

logger = logging.getLogger(__name__)

SHAPES_CLASSES = ("circle", "square", "triangle", "ellipse", "star")

# Sizes are given for a 128 px image and scale linearly with the image side.
_REF_SIZE = 128.0
_MIN_OBJ, _MAX_OBJ = 12.0, 64.0  # circumscribed diameter of a shape, px at 128
MIN_VISIBLE_AREA = 20  # instances with fewer visible pixels are not annotated
MAX_INSTANCES = 6
EMPTY_IMAGE_PROB = 0.02
_JPEG_QUALITY = 95
_SUBPIXEL_SHIFT = 4  # cv2 fixed-point bits for polygon vertices
# Semantic form: label 0 is background, 1..5 the classes; Detectron2's ignore value.
SEM_SEG_CLASSES = ("background",) + SHAPES_CLASSES
SEM_SEG_IGNORE = 255


@dataclass
class RenderedInstance:
    """One painted shape. ``visible`` and ``full`` are (S, S) bool masks."""

    category: int  # index into SHAPES_CLASSES
    visible: np.ndarray
    full: np.ndarray


# ----------------------------------------------------------------------------------------
# Background
# ----------------------------------------------------------------------------------------
def _random_color(rng):
    return rng.uniform(0, 255, size=3)


def _background(rng, size):
    """(S, S, 3) float32 texture: gradient + colour blobs + stripes + clutter lines."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle) + 1.0) / 2.0  # in [0, 1]
    c0, c1 = _random_color(rng), _random_color(rng)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]

    # Low-frequency colour blobs: a coarse random field upsampled smoothly.
    grid = int(rng.integers(3, 7))
    field = rng.normal(0, 1, size=(grid, grid, 3)).astype(np.float32)
    field = cv2.resize(field, (size, size), interpolation=cv2.INTER_CUBIC)
    img += field * rng.uniform(10, 45)

    if rng.random() < 0.5:  # stripes of random period, orientation and colour
        period = rng.uniform(4, 24) * size / _REF_SIZE
        a = rng.uniform(0, np.pi)
        phase = (xx * np.cos(a) + yy * np.sin(a)) * (size - 1) * 2 * np.pi / period
        direction = rng.normal(0, 1, size=3)
        direction /= np.linalg.norm(direction) + 1e-6
        img += np.sin(phase)[..., None] * direction[None, None, :] * rng.uniform(10, 35)

    img = np.ascontiguousarray(img.astype(np.float32))
    for _ in range(int(rng.integers(0, 4))):  # clutter: thin lines that are not objects
        p0 = tuple(int(v) for v in rng.integers(0, size, size=2))
        p1 = tuple(int(v) for v in rng.integers(0, size, size=2))
        thickness = int(rng.integers(1, 3))
        cv2.line(img, p0, p1, _random_color(rng).tolist(), thickness, cv2.LINE_8)
    return img


# ----------------------------------------------------------------------------------------
# Shapes (each drawn as a uint8 mask, 1 inside, without antialiasing)
# ----------------------------------------------------------------------------------------
def _polygon(center, radius, angles):
    """(N, 2) vertices at ``angles`` (radians) and ``radius`` (scalar or (N,)) from center."""
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), angles.shape)
    pts = np.stack(
        [center[0] + radius * np.cos(angles), center[1] + radius * np.sin(angles)], axis=1
    )
    return pts


def _fill_polygon(mask, pts):
    scale = 1 << _SUBPIXEL_SHIFT
    fixed = np.round(pts * scale).astype(np.int32)[None]
    cv2.fillPoly(mask, fixed, 1, cv2.LINE_8, _SUBPIXEL_SHIFT)


def _draw_shape(rng, category, size):
    """Draw one shape of class ``category`` at a random place; returns (S, S) uint8 mask."""
    mask = np.zeros((size, size), np.uint8)
    scale = size / _REF_SIZE
    diameter = rng.uniform(_MIN_OBJ, _MAX_OBJ) * scale
    r = diameter / 2.0
    center = rng.uniform(0.05 * size, 0.95 * size, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    name = SHAPES_CLASSES[category]
    if name == "circle":
        c = tuple(int(round(v * (1 << _SUBPIXEL_SHIFT))) for v in center)
        rad = int(round(r * (1 << _SUBPIXEL_SHIFT)))
        cv2.circle(mask, c, rad, 1, -1, cv2.LINE_8, _SUBPIXEL_SHIFT)
    elif name == "square":
        _fill_polygon(mask, _polygon(center, r, theta + np.arange(4) * np.pi / 2))
    elif name == "triangle":
        jitter = rng.uniform(-0.25, 0.25, size=3)
        _fill_polygon(mask, _polygon(center, r, theta + np.arange(3) * 2 * np.pi / 3 + jitter))
    elif name == "ellipse":
        ratio = rng.uniform(0.35, 0.7)
        c = tuple(int(round(v * (1 << _SUBPIXEL_SHIFT))) for v in center)
        axes = (int(round(r * (1 << _SUBPIXEL_SHIFT))), int(round(r * ratio * (1 << _SUBPIXEL_SHIFT))))
        cv2.ellipse(mask, c, axes, float(np.degrees(theta)), 0, 360, 1, -1, cv2.LINE_8,
                    _SUBPIXEL_SHIFT)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)
        radii = np.tile([r, r * inner], 5)
        _fill_polygon(mask, _polygon(center, radii, theta + np.arange(10) * np.pi / 5))
    else:  # pragma: no cover - SHAPES_CLASSES is fixed
        raise ValueError(f"unknown shape class {name!r}")
    return mask


def _paint(rng, img, mask_bool, background):
    """Paint a shape in a random colour (kept apart from the background under it) with a
    slight linear shading, in place."""
    ys, xs = np.nonzero(mask_bool)
    under = background[ys, xs].mean(axis=0)
    color = _random_color(rng)
    for _ in range(8):  # avoid a colour (almost) equal to what lies underneath
        if np.linalg.norm(color - under) >= 60:
            break
        color = _random_color(rng)
    g = rng.normal(0, 1, size=2) * 0.6  # shading gradient, intensity units per px
    shade = (xs - xs.mean()) * g[0] + (ys - ys.mean()) * g[1]
    img[ys, xs] = color[None, :] + np.clip(shade, -25, 25)[:, None]


def _render(seed, index, image_size):
    """render_image plus the (S, S) bool mask of visible pixels of unannotated instances."""
    rng = np.random.default_rng([int(seed), int(index)])
    size = int(image_size)
    background = _background(rng, size)
    img = background.copy()
    if rng.random() < EMPTY_IMAGE_PROB:
        num = 0
    else:
        num = int(rng.integers(1, MAX_INSTANCES + 1))
    owner = np.full((size, size), -1, np.int16)  # index of the instance on top, per pixel
    drawn = []
    for k in range(num):
        category = int(rng.integers(0, len(SHAPES_CLASSES)))
        full = _draw_shape(rng, category, size).astype(bool)
        if not full.any():
            continue
        owner[full] = k
        _paint(rng, img, full, background)
        drawn.append((k, category, full))
    noise_sigma = rng.uniform(3, 10)
    img += rng.normal(0, noise_sigma, size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    instances = []
    unannotated = np.zeros((size, size), bool)
    for k, category, full in drawn:
        visible = owner == k
        if int(visible.sum()) >= MIN_VISIBLE_AREA:
            instances.append(RenderedInstance(category, visible, full))
        else:
            unannotated |= visible
    return image, instances, unannotated


def render_image(seed, index, image_size):
    """Render image ``index`` of the data set drawn with ``seed``.

    Returns:
        image: (S, S, 3) uint8 RGB.
        instances: list[RenderedInstance] in painting order, only those with at least
            ``MIN_VISIBLE_AREA`` visible pixels (the others stay painted, unannotated).
    """
    image, instances, _ = _render(seed, index, image_size)
    return image, instances


def render_semantic_labels(seed, index, image_size):
    """(S, S) uint8 label map of image ``index``: 0 background, 1 + class index on the
    visible pixels of each annotated instance, SEM_SEG_IGNORE on those of unannotated
    (tiny) ones."""
    _, instances, unannotated = _render(seed, index, image_size)
    labels = np.zeros((int(image_size),) * 2, np.uint8)
    for inst in instances:
        labels[inst.visible] = inst.category + 1
    labels[unannotated] = SEM_SEG_IGNORE
    return labels


# ----------------------------------------------------------------------------------------
# Writing a data set
# ----------------------------------------------------------------------------------------
def datasets_root():
    """Detectron2's convention: $DETECTRON2_DATASETS, else ``datasets``."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def shapes_dirname(split, num_images, image_size, seed):
    """Folder name of one generated data set, e.g. ``shapes_train_600_128px_s0``."""
    return f"shapes_{split}_{int(num_images)}_{int(image_size)}px_s{int(seed)}"


def shapes_paths(root, split, num_images, image_size, seed):
    """(folder, json_file, image_root) of a data set under ``root``."""
    folder = os.path.join(root, shapes_dirname(split, num_images, image_size, seed))
    return folder, os.path.join(folder, "annotations.json"), os.path.join(folder, "images")


def encode_mask(mask):
    """(H, W) bool -> COCO compressed RLE dict with ``counts`` as str."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _write_files(folder, num_images, image_size, seed, split):
    """Render all images into ``folder`` (images/ + annotations.json)."""
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir)
    images, annotations = [], []
    ann_id = 1
    for i in range(int(num_images)):
        image, instances = render_image(seed, i, image_size)
        file_name = f"{i:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:  # pragma: no cover
            raise RuntimeError(f"cv2 failed to encode image {i} of {folder}")
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(buf.tobytes())
        image_id = i + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": int(image_size),
             "width": int(image_size)}
        )
        for inst in instances:
            rle = encode_mask(inst.visible)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": inst.category + 1,
                    "segmentation": rle,
                    "area": int(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    data = {
        "info": {
            "description": f"d2seg synthetic shapes, split {split}",
            "num_images": int(num_images), "image_size": int(image_size), "seed": int(seed),
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPES_CLASSES)
        ],
    }
    with open(os.path.join(folder, "annotations.json"), "w") as f:
        json.dump(data, f)


def _write_atomically(folder, marker, write, what):
    """Create ``folder`` by ``write(tmp_folder)`` + rename, unless ``marker`` (a file
    inside it) exists. Another process that finishes first wins; its copy is kept."""
    if os.path.isfile(marker):
        return
    root = os.path.dirname(folder) or "."
    os.makedirs(root, exist_ok=True)
    if os.path.isdir(folder):  # not written by this code (it always has the marker)
        raise FileExistsError(
            f"'{folder}' exists but has no {os.path.basename(marker)}; delete it so that "
            "d2seg can generate the shapes data set there"
        )
    logger.info(f"Generating {what} in {folder}")
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=root)
    try:
        inner = os.path.join(tmp, "data")
        write(inner)
        try:
            os.rename(inner, folder)
        except OSError:
            if not os.path.isfile(marker):
                raise
            logger.info(f"{folder} was written by another process meanwhile; keeping it")
        else:
            logger.info(f"Generated {folder} in {time.perf_counter() - start:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_shapes(split, num_images, image_size, seed, root=None):
    """Write the data set under ``root`` (None: :func:`datasets_root`) unless it is there.

    The files are written into a temporary folder beside the target and renamed into place
    at the end, so other processes never see a half-written data set; when two processes
    generate at once, the first rename wins and the other one's copy is deleted.

    Returns:
        (json_file, image_root)
    """
    root = datasets_root() if root is None else os.fspath(root)
    folder, json_file, image_root = shapes_paths(root, split, num_images, image_size, seed)
    what = (f"shapes_{split} ({int(num_images)} images, {int(image_size)} px, "
            f"seed {int(seed)})")
    _write_atomically(
        folder, json_file,
        lambda out: _write_files(out, num_images, image_size, seed, split), what,
    )
    return json_file, image_root


def shapes_sem_seg_paths(root, split, num_images, image_size, seed):
    """(folder, label_root) of the semantic labels of a shapes data set under ``root``."""
    folder = os.path.join(
        root, "shapes_sem_seg_" + shapes_dirname(split, num_images, image_size, seed)[len("shapes_"):]
    )
    return folder, os.path.join(folder, "labels")


def _write_labels(folder, num_images, image_size, seed):
    label_dir = os.path.join(folder, "labels")
    os.makedirs(label_dir)
    for i in range(int(num_images)):
        labels = render_semantic_labels(seed, i, image_size)
        if not cv2.imwrite(os.path.join(label_dir, f"{i:06d}.png"), labels):  # pragma: no cover
            raise RuntimeError(f"cv2 failed to write label map {i} of {folder}")
    with open(os.path.join(folder, "info.json"), "w") as f:
        json.dump({"classes": list(SEM_SEG_CLASSES), "ignore_label": SEM_SEG_IGNORE,
                   "num_images": int(num_images), "image_size": int(image_size),
                   "seed": int(seed)}, f)


def generate_shapes_sem_seg(split, num_images, image_size, seed, root=None):
    """Write the semantic form of a shapes data set (and its images, through
    :func:`generate_shapes`) unless it is there: one PNG label map per image, 0 background,
    1..5 the classes of SHAPES_CLASSES, SEM_SEG_IGNORE on unannotated tiny fragments.

    Returns:
        (image_root, label_root): ``images/NNNNNN.jpg`` and ``labels/NNNNNN.png``.
    """
    root = datasets_root() if root is None else os.fspath(root)
    _, image_root = generate_shapes(split, num_images, image_size, seed, root)
    folder, label_root = shapes_sem_seg_paths(root, split, num_images, image_size, seed)
    what = (f"shapes_sem_seg_{split} labels ({int(num_images)} images, {int(image_size)} px, "
            f"seed {int(seed)})")
    _write_atomically(
        folder, os.path.join(folder, "info.json"),
        lambda out: _write_labels(out, num_images, image_size, seed), what,
    )
    return image_root, label_root
