"""Masks resized to a large output and thresholded, a few at a time.

Shape shorthand: R: masks; h, w: their size; H, W: the output size.

Resizing R mask probabilities to a 3000x4000 photo in one call holds R x H x W floats
(4 bytes each: 75 masks, 3.6 GB) before the threshold turns them into R x H x W bools
(1 byte each). :func:`resize_and_threshold` resizes and thresholds a chunk of masks at a
time into the bool output, so that the floats of only one chunk exist at once. Each mask is
resized on its own in either way, so the result is the same, bit for bit.
"""
import torch

__all__ = ["resize_and_threshold"]


def resize_and_threshold(masks, resize, threshold, max_chunk_bytes=1 << 28):
    """``resize(masks) > threshold``, computed for a chunk of masks at a time.

    Args:
        masks (Tensor): (R, ...) mask probabilities or logits, one mask per row.
        resize (callable): maps a (r, ...) chunk of ``masks`` to (r, H, W) floats; it must
            treat each row on its own (e.g. ``F.interpolate``), as in one call.
        threshold (float): kept where the resized value is greater.
        max_chunk_bytes (int): the most bytes of resized floats held at once (at least one
            mask is resized at a time).

    Returns:
        Tensor: (R, H, W) bool.
    """
    if len(masks) == 0:
        return resize(masks) > threshold
    first = resize(masks[:1])
    out = torch.empty((len(masks), *first.shape[1:]), dtype=torch.bool, device=first.device)
    out[:1] = first > threshold
    per_mask = first[0].numel() * first.element_size()
    step = max(1, max_chunk_bytes // max(per_mask, 1))
    del first
    for start in range(1, len(masks), step):
        out[start:start + step] = resize(masks[start:start + step]) > threshold
    return out
