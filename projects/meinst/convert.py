"""AdelaiDet MEInst checkpoint -> d2seg state dict (and its encoding file).

The key mapping (docs/meinst.md has the table):
    backbone.*                                     -> backbone.*                (unchanged)
    proposal_generator.MEInst_head.{cls,bbox,share}_tower.*, cls_logits, bbox_pred,
        ctrness, scales                            -> proposal_generator.fcos_head.*
    proposal_generator.MEInst_head.mask_tower.*    -> mask_head.mask_tower.*
    proposal_generator.MEInst_head.mask_pred.*     -> mask_head.mask_pred.*
        (large kernel: mask_pred.conv_xx.conv.*    -> mask_head.mask_pred.conv_xx.*)
    proposal_generator.mask_encoding.{components, explained_variances, means}
                                                   -> mask_head.encoding.*
DCNv1 tower layers (AdelaiDet's default TYPE_DEFORMABLE) become exact DCNv2 layers: the
offset conv gets 9 mask channels with zero weights and a large bias (mask = sigmoid
= 1 - 2e-9), and the missing conv bias becomes zeros.

    python -m d2seg.meinst.convert MEInst_R_50_1x.pth out.pth --encoding-out enc.npz
"""
import argparse
import re
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .encoding import MaskEncodingParams, save_encoding

__all__ = ["convert_adelaidet_meinst"]

_MASK_LOGIT_BIAS = 20.0

_RULES = [
    (r"^proposal_generator\.MEInst_head\.mask_pred\.(conv_[lr][12])\.conv\.", r"mask_head.mask_pred.\1."),
    (r"^proposal_generator\.MEInst_head\.(mask_tower|mask_pred)\.", r"mask_head.\1."),
    (r"^proposal_generator\.MEInst_head\.", r"proposal_generator.fcos_head."),
    (r"^proposal_generator\.mask_encoding\.", r"mask_head.encoding."),
]


def _rename(key: str) -> str:
    for pat, rep in _RULES:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return key


def convert_adelaidet_meinst(
    state_dict: Dict[str, Tensor], whiten: bool = True, sigmoid: bool = True
) -> Tuple[Dict[str, Tensor], Optional[MaskEncodingParams]]:
    """Rename an AdelaiDet MEInst state dict (its "model" entry) to d2seg's layout.

    Returns:
        (state dict for OneStageDetector + MEInstMaskHead, the encoding found in the
        checkpoint as MaskEncodingParams, or None if it has none). ``whiten`` and
        ``sigmoid`` are the flags the AdelaiDet model was trained with (its
        MODEL.MEInst.WHITEN / SIGMOID, both True by default).
    """
    out = {}
    for k, v in state_dict.items():
        out[_rename(k)] = v
    # DCNv1 -> DCNv2 (offset conv with 18 outputs -> 27, mask logits ~ +inf).
    for k in list(out):
        if k.endswith(".offset.weight") and out[k].shape[0] == 18:
            w = out[k]
            out[k] = torch.cat([w, w.new_zeros((9,) + tuple(w.shape[1:]))])
            bk = k[: -len("weight")] + "bias"
            b = out.get(bk, w.new_zeros(18))
            out[bk] = torch.cat([b, b.new_full((9,), _MASK_LOGIT_BIAS)])
            ck = k[: -len("offset.weight")] + "conv.bias"
            wk = k[: -len("offset.weight")] + "conv.weight"
            if ck not in out and wk in out:
                out[ck] = out[wk].new_zeros(out[wk].shape[0])
    params = None
    prefix = "mask_head.encoding."
    if prefix + "components" in out:
        comps = out[prefix + "components"].double().numpy()
        m = int(round(comps.shape[1] ** 0.5))
        params = MaskEncodingParams(comps, out[prefix + "explained_variances"].double().numpy(),
                                    out[prefix + "means"].double().numpy(), m, whiten, sigmoid,
                                    dataset="adelaidet-checkpoint")
    return out, params


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert an AdelaiDet MEInst checkpoint.")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--encoding-out", default="", help="also write the checkpoint's encoding (.npz)")
    p.add_argument("--no-whiten", action="store_true")
    p.add_argument("--no-sigmoid", action="store_true")
    a = p.parse_args(argv)
    ckpt = torch.load(a.input, map_location="cpu", weights_only=False)
    sd = ckpt.get("model", ckpt)
    sd = {k: torch.as_tensor(v) for k, v in sd.items()}
    new, params = convert_adelaidet_meinst(sd, not a.no_whiten, not a.no_sigmoid)
    torch.save({"model": new, "__author__": "d2seg.meinst.convert"}, a.output)
    if a.encoding_out and params is not None:
        save_encoding(a.encoding_out, params)
    print(f"wrote {a.output} ({len(new)} tensors)" + (f" and {a.encoding_out}" if a.encoding_out and params else ""))


if __name__ == "__main__":
    main()
