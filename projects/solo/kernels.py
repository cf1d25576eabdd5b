"""SOLOv2's dynamic 1x1 convolution: each instance's kernel applied to its image's
mask features.

Shape shorthand:
    R: instances    E: mask feature channels    N: images    H, W: mask feature size

Uses ``d2seg.layers.dynamic_kernel_product`` (plain PyTorch too: per-image matmuls, see
docs/ops.md) when the package provides it, else the matrix product below (the same math).
"""
import torch

__all__ = ["dynamic_kernel_product", "dynamic_kernel_product_torch"]


def dynamic_kernel_product_torch(kernels, features, im_inds):
    """
    Args:
        kernels (Tensor): (R, E) one 1x1 kernel per instance.
        features (Tensor): (N, E, H, W) mask features.
        im_inds (Tensor): (R,) long, the image of each instance.
    Returns:
        Tensor: (R, H, W), out[r] = sum_e kernels[r, e] * features[im_inds[r], e].
    """
    n, e, h, w = features.shape
    if kernels.dim() != 2 or kernels.shape[1] != e:
        raise ValueError(f"kernels must be (R, {e}) for features {tuple(features.shape)}, "
                         f"got {tuple(kernels.shape)}")
    if kernels.shape[0] == 0:
        return features.new_zeros((0, h, w)) + 0 * kernels.sum()
    order = torch.argsort(im_inds, stable=True)
    chunks = []
    for img in im_inds[order].unique_consecutive().tolist():
        sel = order[im_inds[order] == img]
        chunks.append(kernels[sel] @ features[img].reshape(e, h * w))
    out = torch.cat(chunks)  # rows in `order`
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return out[inverse].reshape(-1, h, w)


def dynamic_kernel_product(kernels, features, im_inds):
    """``d2seg.layers.dynamic_kernel_product`` (PyTorch, not a compiled op) if available,
    else :func:`dynamic_kernel_product_torch`."""
    from d2seg import layers

    fn = getattr(layers, "dynamic_kernel_product", None)
    if fn is not None:
        return fn(kernels, features, im_inds)
    return dynamic_kernel_product_torch(kernels, features, im_inds)
