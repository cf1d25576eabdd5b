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
over the photo in numpy, a band of rows at a time: about 12 bytes a pixel; the picture differs from
matplotlib's own compositing by rounding (at most a few levels of 255, tested).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, GenericMask, Visualizer, _create_text_labels

__all__ = ["draw_instances", "mask_polygons", "render"]


def mask_polygons(mask: np.ndarray) -> list:
    """The contour polygons Detectron2's ``GenericMask`` draws for a binary mask, ``[x, y, x, y,
    ...]`` each, shifted by half a pixel onto pixel centres; contours with fewer than 3 points are
    left out. ``mask`` (H, W) bool or uint8 is not copied when it is C-contiguous."""
    if mask.dtype == np.bool_:
        mask = mask.view(np.uint8)  # same bytes, 0 / 1
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)[-2:]
    if hierarchy is None:
        return []
    return [c.reshape(-1) + 0.5 for c in contours if c.size >= 6]


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
        alpha = drawing[r:r + rows, :, 3:].astype(np.float32) * (1.0 / 255.0)
        band = photo[r:r + rows] * (1.0 - alpha) + drawing[r:r + rows, :, :3] * alpha
        out[r:r + rows] = np.rint(band).clip(0, 255).astype(np.uint8)
    return out
