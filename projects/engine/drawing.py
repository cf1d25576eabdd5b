"""Drawing predictions without copying the masks: Detectron2's picture, at the memory the masks need.

``Visualizer.draw_instance_predictions`` keeps a uint8 copy of every mask (``GenericMask``) until the
picture is done, and selecting the instances above a threshold (``instances[scores >= t]``) copies
the whole mask tensor once more: on a 3000x4000 photo with 100 masks (1.1 GiB of bools) drawing
added 2.4 GiB. :func:`draw_instances` draws the same picture (the same polygons, boxes, labels,
colours and order: Detectron2 draws masks as their contour polygons anyway) from polygons that
are traced one mask at a time from a uint8 *view* of the bool mask, so the masks are never copied.

Rendering the picture is the other cost: matplotlib resamples the ``imshow``-ed photo through
RGBA float buffers, about 110 bytes a pixel (1.3 GiB for 12 megapixels) whatever is drawn on it.
:func:`render` renders only the drawing (the photo hidden, a transparent background) and lays it
over the photo in numpy, a band of rows at a time: 20-30 bytes a pixel measured (matplotlib's
buffer of the drawing and its copy); the picture differs from matplotlib's own compositing by
rounding (at most a few levels of 255, tested).
"""
from __future__ import annotations

import cv2
import matplotlib.colors as mplc
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Instances
from detectron2.utils.colormap import random_color
from detectron2.utils.visualizer import (_LARGE_MASK_AREA_THRESH, _OFF_WHITE, ColorMode, GenericMask, Visualizer,
                                         _create_text_labels)

__all__ = ["draw_instances", "draw_sem_seg", "mask_polygons", "render"]


def mask_polygons(mask: np.ndarray) -> list:
    """The contour polygons Detectron2's ``GenericMask`` draws for a binary mask, ``[x, y, x, y,
    ...]`` each, shifted by half a pixel onto pixel centres; contours with fewer than 3 points are
    left out. ``mask`` (H, W) bool or uint8 is not copied when it is C-contiguous."""
    if mask.dtype == np.bool_:
        mask = mask.view(np.uint8)  # same bytes, 0 / 1
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    return _contours(mask)[0]


def _contours(mask_u8: np.ndarray):
    """(polygons as GenericMask traces them, has_holes) of a C-contiguous uint8 0/1 mask."""
    contours, hierarchy = cv2.findContours(mask_u8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)[-2:]
    if hierarchy is None:
        return [], False
    has_holes = bool((hierarchy.reshape(-1, 4)[:, 3] >= 0).any())
    return [c.reshape(-1) + 0.5 for c in contours if c.size >= 6], has_holes


def _over(photo_rows: np.ndarray, rgb, alpha: np.ndarray) -> np.ndarray:
    """Colour ``rgb`` (0-255, per pixel or one colour) laid over uint8 ``photo_rows`` with
    opacity ``alpha`` (0-1, (h, w, 1)): matplotlib's "over" compositing, rounded to uint8."""
    return np.rint(photo_rows * (1.0 - alpha) + rgb * alpha).clip(0, 255).astype(np.uint8)


def _median(counts: np.ndarray) -> float:
    """np.median of the sorted indices that ``counts`` (a histogram over 0..n-1) describes."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    lo, hi = np.searchsorted(cum, [(n - 1) // 2, n // 2], side="right")
    return (float(lo) + float(hi)) / 2.0


def _draw_text_in_mask(visualizer: Visualizer, mask_u8: np.ndarray, text: str, color):
    """Detectron2's ``Visualizer._draw_text_in_mask`` (the text at the median pixel of the
    largest connected component and of every very large one) with the medians taken from row and
    column counts instead of the (2, N) int64 list of the component's pixels (192 MB for a region
    of a 12-megapixel photo); the same positions."""
    num, cc_labels, stats, _ = cv2.connectedComponentsWithStats(mask_u8, 8)
    if stats[1:, -1].size == 0:
        return
    largest = int(np.argmax(stats[1:, -1])) + 1
    for cid in range(1, num):
        if cid == largest or stats[cid, -1] > _LARGE_MASK_AREA_THRESH:
            component = cc_labels == cid
            center = (_median(component.sum(axis=0)), _median(component.sum(axis=1)))  # (x, y)
            visualizer.draw_text(text, center, color=color)


def draw_instances(visualizer: Visualizer, instances: Instances, keep=None):
    """``visualizer.draw_instance_predictions(instances[keep])``, same picture, without copying the
    masks. ``keep``: a bool tensor or index tensor selecting the instances to draw (all if None).
    Instances without ``pred_boxes`` (or in a colour mode other than ``ColorMode.IMAGE``) go through
    Detectron2's own path."""
    if keep is None:
        idx = torch.arange(len(instances))
    elif keep.dtype == torch.bool:
        idx = keep.nonzero().flatten()
    else:
        idx = keep
    lean = (instances.has("pred_masks") and instances.has("pred_boxes")
            and visualizer._instance_mode == ColorMode.IMAGE and not instances.has("pred_keypoints"))
    if not lean:
        return visualizer.draw_instance_predictions(instances[idx] if keep is not None else instances)
    idx = idx.tolist()
    boxes = instances.pred_boxes.tensor[idx]
    scores = instances.scores[idx] if instances.has("scores") else None
    classes = instances.pred_classes[idx].tolist() if instances.has("pred_classes") else None
    labels = _create_text_labels(classes, scores, visualizer.metadata.get("thing_classes", None))
    height, width = visualizer.output.height, visualizer.output.width
    masks = []
    for i in idx:  # one mask at a time: a view of the bool tensor, traced, then let go
        m = instances.pred_masks[i]
        m = m.numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        masks.append(GenericMask(mask_polygons(m), height, width))
    return visualizer.overlay_instances(masks=masks, boxes=boxes.numpy() if len(idx) else None,
                                        labels=labels, alpha=0.5)


def draw_sem_seg(visualizer: Visualizer, sem_seg, area_threshold=None, alpha=0.8, rows: int = 128):
    """``visualizer.draw_sem_seg(sem_seg)``: the same labels, colours, polygons and texts, largest
    class first, at the memory one class's bool mask needs. Detectron2 hands every class whose
    region has holes to matplotlib as a float32 RGBA layer of the whole picture (16 bytes a
    pixel, kept until the picture is rendered: 1.1 GiB for six classes of a 12-megapixel photo);
    here such a region is blended into the photo instead (same alpha, the same arithmetic as
    matplotlib's compositing up to rounding), a band of rows at a time. Regions without holes are
    drawn as Detectron2 draws them (outlined polygons)."""
    images = visualizer.output.ax.get_images()
    photo = np.asarray(images[0].get_array()) if images else None
    if photo is None or photo.dtype != np.uint8 or photo.shape[:2] != (visualizer.output.height,
                                                                      visualizer.output.width):
        return visualizer.draw_sem_seg(sem_seg, area_threshold=area_threshold, alpha=alpha)
    sem = torch.as_tensor(sem_seg)
    if sem.numel() and int(sem.min()) >= 0:
        areas = torch.bincount(sem.flatten())
    else:  # negative labels are not classes
        areas = torch.bincount(sem[sem >= 0].flatten().to(torch.int64), minlength=1)
    labels = [int(k) for k in torch.argsort(-areas, stable=True) if areas[k] > 0]
    stuff = visualizer.metadata.stuff_classes
    blended = photo.copy()
    h, w = sem.shape
    for label in labels:
        if label >= len(stuff):
            continue
        try:
            color = [x / 255 for x in visualizer.metadata.stuff_colors[label]]
        except (AttributeError, IndexError):
            color = None
        color = mplc.to_rgb(color if color is not None else random_color(rgb=True, maximum=1))
        mask = np.ascontiguousarray((sem == label).numpy()).view(np.uint8)  # 1 byte a pixel
        polygons, has_holes = _contours(mask)
        valid = False
        if not has_holes:
            for segment in polygons:
                if mask_util.area(mask_util.frPyObjects([segment], h, w)) < (area_threshold or 0):
                    continue
                valid = True
                visualizer.draw_polygon(segment.reshape(-1, 2), color=color, edge_color=_OFF_WHITE, alpha=alpha)
        else:
            valid = True
            colour = np.asarray(color, dtype=np.float32) * 255.0
            for r in range(0, h, rows):
                blended[r:r + rows] = _over(blended[r:r + rows], colour,
                                            mask[r:r + rows, :, None].astype(np.float32) * alpha)
        if valid:
            _draw_text_in_mask(visualizer, mask, stuff[label], visualizer._change_color_brightness(color, 0.7))
    images[0].set_data(blended)
    return visualizer.output


def render(vis_image, rows: int = 128) -> np.ndarray:
    """The RGB uint8 picture of a Detectron2 ``VisImage`` (what ``vis_image.get_image()`` returns),
    made without handing the photo to matplotlib's renderer (module doc). Falls back to
    ``get_image()`` where the picture is scaled (``scale != 1``) or has no photo."""
    images = vis_image.ax.get_images()
    if vis_image.scale != 1.0 or not images:
        return vis_image.get_image()
    photo_artist = images[0]  # VisImage.reset_image's imshow, the first image of the axes
    photo = np.asarray(photo_artist.get_array())
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        return vis_image.get_image()
    photo_artist.set_visible(False)
    try:
        buf, (width, height) = vis_image.canvas.print_to_buffer()
    finally:
        photo_artist.set_visible(True)
    if (height, width) != photo.shape[:2]:
        return vis_image.get_image()
    drawing = np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 4)  # straight (not premultiplied) alpha
    out = np.empty_like(photo)
    for r in range(0, height, rows):
        out[r:r + rows] = _over(photo[r:r + rows], drawing[r:r + rows, :, :3],
                                drawing[r:r + rows, :, 3:].astype(np.float32) * (1.0 / 255.0))
    return out
