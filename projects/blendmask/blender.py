"""BlendMask's blender: crop the bases to each box, upsample each instance's attentions,
softmax over the bases, weighted sum.

Shape shorthand:
    N: images, K: bases, Hb, Wb: size of the bases, R: instances, M: attention side,
    S: crop side (BOTTOM_RESOLUTION, the paper's R; 56).
"""
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["crop_bases", "blend"]


def crop_bases(bases: Tensor, boxes: Tensor, im_inds: Tensor, size: int, scale: float, sampling_ratio: int = 1) -> Tensor:
    """(R, K, S, S) aligned RoIAlign of ``bases`` (N, K, Hb, Wb) inside ``boxes`` (R, 4)
    (x0, y0, x1, y1 in input pixels) of images ``im_inds`` (R,); ``scale`` = 1 / stride of
    the bases. Sample points sit at the centres of the S x S cells of the box."""
    if boxes.shape[0] == 0 and not torch.jit.is_tracing():  # an ONNX graph keeps the general path
        return bases.new_zeros((0, bases.shape[1], size, size))
    rois = torch.cat([im_inds.to(boxes.dtype)[:, None], boxes], dim=1)
    return roi_align(bases, rois.to(bases.dtype), (size, size), spatial_scale=scale,
                     sampling_ratio=sampling_ratio, aligned=True)


def blend(rois: Tensor, attns: Tensor, attn_size: int, mode: str = "bilinear") -> Tensor:
    """(R, S, S) mask logits: sum_k softmax_k(upsample(attns))[k] * rois[k].

    Args:
        rois: (R, K, S, S) cropped bases.
        attns: (R, K * M * M) top-level attentions, basis-major (k, then row, then column).
        attn_size: M.
        mode: interpolation of the attentions from M x M to S x S.
    """
    R, K, S, _ = rois.shape
    if attns.shape != (R, K * attn_size * attn_size):
        raise ValueError(
            f"blend: attentions must be (R, K*M*M) = ({R}, {K * attn_size * attn_size}), got {tuple(attns.shape)}"
        )
    if R == 0 and not torch.jit.is_tracing():  # an ONNX graph keeps the general path
        return rois.new_zeros((0, S, S)) + attns.sum() * 0
    a = attns.reshape(R, K, attn_size, attn_size)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    a = F.interpolate(a, size=(S, S), mode=mode, **kw).softmax(dim=1)
    return (rois * a).sum(dim=1)
