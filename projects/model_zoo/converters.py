"""One front door for foreign checkpoints: a registry of converters, each a pair
``detect(state_dict) -> bool`` and ``convert(state_dict) -> state_dict``.

The per-method key mappings live with their methods and are only called from here:

    adelaidet-meinst     d2seg.meinst.convert.convert_adelaidet_meinst
    adelaidet-condinst   d2seg.condinst.checkpoint.convert_adelaidet_condinst
    adelaidet-blendmask  d2seg.blendmask.checkpoint.convert_adelaidet_blendmask
    adelaidet-fcos       identity (our FCOS uses AdelaiDet's names, docs/fcos.md)
    adelaidet-solov2     identity (our SOLOv2 uses AdelaiDet's names, docs/solo.md)
    sparseinst           d2seg.sparseinst.checkpoint.convert_hustvl_state_dict
    pointrend-upstream   d2seg.pointrend.compat.convert_upstream_state_dict

Every converter also applies the same clean-up (:func:`_clean`): a DistributedDataParallel
``module.`` prefix is stripped, numpy arrays (Detectron2 ``.pkl`` files) become tensors,
and buffers that old checkpoints stored but our models recompute (``pixel_mean``,
``pixel_std``, anchor ``cell_anchors``, AdelaiDet's ``_iter`` counter, BatchNorm's
``num_batches_tracked`` where our model has FrozenBN) are dropped -- only when the target
model does not have them, and each drop is reported.

S: a state dict, name -> tensor.
"""
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "Converter", "ConversionResult", "CheckpointMismatchError", "register_converter",
    "get_converter", "list_converters", "detect_format", "convert_state_dict",
    "compare_with_model", "SOURCES",
]

logger = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """A (converted) checkpoint does not fit the model; the message names the keys."""


@dataclass
class Converter:
    """A foreign checkpoint format.

    Attributes:
        name: registry name, e.g. "adelaidet-condinst".
        source: the family the CLI's ``--from`` names ("adelaidet", "sparseinst",
            "pointrend-upstream").
        description: one line for logs and docs.
        detect: S -> bool, True when the keys are this format's (and not ours already).
        convert: S -> S, renames keys (no clean-up needed: :func:`_clean` runs first).
        renames: False when the format's names equal ours (the conversion is the clean-up).
        rename_key: key -> new key, for tracing where each key went when ``convert`` cannot
            be applied to one key at a time (default: ``convert({key: value})``).
    """

    name: str
    source: str
    description: str
    detect: Callable[[Dict], bool]
    convert: Callable[[Dict], Dict]
    renames: bool = True
    rename_key: Optional[Callable[[str], str]] = None


@dataclass
class ConversionResult:
    """What :func:`convert_state_dict` did: the new state dict, the converter used, and
    for every source key where it went (``mapped``: source -> ours) or that it was
    dropped (``dropped``: source key -> reason); ``added``: keys the converter created
    (ours -> the source key it derived them from)."""

    state_dict: Dict[str, torch.Tensor]
    converter: Optional[Converter]
    mapped: Dict[str, str] = field(default_factory=dict)
    dropped: Dict[str, str] = field(default_factory=dict)
    added: Dict[str, str] = field(default_factory=dict)

    @property
    def renamed(self) -> Dict[str, str]:
        return {k: v for k, v in self.mapped.items() if k != v}

    def summary(self) -> str:
        name = self.converter.name if self.converter else "none"
        return (f"converter {name}: {len(self.mapped)} tensors kept ({len(self.renamed)} renamed), "
                f"{len(self.dropped)} dropped, {len(self.added)} created")


_CONVERTERS: Dict[str, Converter] = {}
SOURCES = ("adelaidet", "sparseinst", "pointrend-upstream")


def register_converter(conv: Converter) -> Converter:
    if conv.name in _CONVERTERS:
        raise KeyError(f"converter {conv.name!r} is already registered")
    if conv.source not in SOURCES:
        raise ValueError(f"converter {conv.name!r}: unknown source {conv.source!r}; known: {SOURCES}")
    _CONVERTERS[conv.name] = conv
    return conv


def get_converter(name: str) -> Converter:
    if name not in _CONVERTERS:
        raise KeyError(f"unknown checkpoint converter {name!r}; known: {sorted(_CONVERTERS)}")
    return _CONVERTERS[name]


def list_converters(source: Optional[str] = None) -> List[Converter]:
    return [c for c in _CONVERTERS.values() if source in (None, "auto", c.source)]


# ----------------------------------------------------------------------------- clean-up
# Buffers that older checkpoints carry and our models recompute (dropped when the target
# model has no such key). Patterns on the full key.
_RECOMPUTED = [
    (re.compile(r"^pixel_(mean|std)$"), "input normalisation (ours comes from MODEL.PIXEL_MEAN/STD)"),
    (re.compile(r"(^|\.)anchor_generator\.cell_anchors\.\d+$"), "anchors are recomputed"),
    (re.compile(r"(^|\.)_iter$"), "AdelaiDet's iteration counter"),
    (re.compile(r"\.num_batches_tracked$"), "BatchNorm counter (our layer is FrozenBN)"),
]


def _as_tensor(v):
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return torch.as_tensor(v)


def _clean(sd: Dict) -> Tuple[Dict, Dict[str, str]]:
    """Strip ``module.`` and make tensors. Returns (S, origin: new key -> source key)."""
    out, origin = {}, {}
    for k, v in sd.items():
        new = k[len("module."):] if k.startswith("module.") else k
        out[new] = _as_tensor(v)
        origin[new] = k
    return out, origin


def _recomputed(key: str, target: Optional[set]) -> Optional[str]:
    """Why ``key`` (a d2seg name) is dropped, or None to keep it."""
    if target is not None and key in target:
        return None
    return next((why for pat, why in _RECOMPUTED if pat.search(key)), None)


# ----------------------------------------------------------------------------- formats
def _has_prefix(sd, *prefixes):
    return any(k.startswith(prefixes) for k in sd)


def _meinst(sd):
    from d2seg.meinst.convert import convert_adelaidet_meinst

    return convert_adelaidet_meinst(sd)[0]


def _meinst_key(key):
    from d2seg.meinst.convert import _rename

    return _rename(key)


def _condinst(sd):
    from d2seg.condinst.checkpoint import convert_adelaidet_condinst

    return convert_adelaidet_condinst(sd)


def _blendmask(sd):
    from d2seg.blendmask.checkpoint import convert_adelaidet_blendmask

    return convert_adelaidet_blendmask(sd)


def _sparseinst(sd):
    from d2seg.sparseinst.checkpoint import convert_hustvl_state_dict

    return convert_hustvl_state_dict(sd)


def _pointrend(sd):
    from d2seg.pointrend.compat import convert_upstream_state_dict

    return convert_upstream_state_dict(sd)


def _identity(sd):
    return dict(sd)


register_converter(Converter(
    "adelaidet-meinst", "adelaidet", "AdelaiDet MEInst (MEInst_head, mask_encoding)",
    lambda sd: _has_prefix(sd, "proposal_generator.MEInst_head.", "proposal_generator.mask_encoding."),
    _meinst, rename_key=_meinst_key))
register_converter(Converter(
    "adelaidet-condinst", "adelaidet", "AdelaiDet CondInst (top-level controller, mask_branch)",
    lambda sd: "controller.weight" in sd and _has_prefix(sd, "mask_branch."),
    _condinst))
register_converter(Converter(
    "adelaidet-blendmask", "adelaidet", "AdelaiDet BlendMask (top-level top_layer, basis_module)",
    lambda sd: "top_layer.weight" in sd and _has_prefix(sd, "basis_module."),
    _blendmask))
register_converter(Converter(
    "adelaidet-fcos", "adelaidet", "AdelaiDet FCOS (names equal ours)",
    lambda sd: _has_prefix(sd, "proposal_generator.fcos_head.") and not _has_prefix(sd, "mask_head."),
    _identity, renames=False))
register_converter(Converter(
    "adelaidet-solov2", "adelaidet", "AdelaiDet SOLOv2 (names equal ours)",
    lambda sd: _has_prefix(sd, "ins_head.cate_tower.", "ins_head.kernel_pred.")
    and _has_prefix(sd, "mask_head.convs_all_levels."),
    _identity, renames=False))
register_converter(Converter(
    "sparseinst", "sparseinst", "hustvl/SparseInst (names equal ours)",
    lambda sd: _has_prefix(sd, "decoder.inst_branch.") and _has_prefix(sd, "encoder."),
    _sparseinst, renames=False))
register_converter(Converter(
    "pointrend-upstream-v1", "pointrend-upstream",
    "Detectron2 PointRend, first checkpoints (roi_heads.mask_point_head / mask_coarse_head)",
    lambda sd: _has_prefix(sd, "roi_heads.mask_point_head.", "roi_heads.mask_coarse_head."),
    _pointrend))
register_converter(Converter(
    "pointrend-upstream", "pointrend-upstream", "Detectron2 PointRend (current names equal ours)",
    lambda sd: _has_prefix(sd, "roi_heads.mask_head.point_head.", "sem_seg_head.point_head."),
    _pointrend, renames=False))


def _strip_module(sd):
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def detect_format(state_dict: Dict, source: str = "auto", renaming_only: bool = False) -> Optional[Converter]:
    """The first registered converter (of ``source``, or any for "auto") whose ``detect``
    accepts the keys; None if none does. ``renaming_only`` skips formats whose names equal
    ours (what loading does: those need no conversion beyond the clean-up)."""
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; choose from {('auto',) + SOURCES}")
    keys = _strip_module(dict.fromkeys(state_dict))
    for conv in list_converters(source):
        if renaming_only and not conv.renames:
            continue
        if conv.detect(keys):
            return conv
    return None


def unwrap(checkpoint) -> Dict:
    """The state dict inside a checkpoint object ({"model": S, ...}, {"state_dict": S} or S)."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                return checkpoint[key]
        return checkpoint
    raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")


def convert_state_dict(checkpoint, source: str = "auto", target_keys: Optional[Iterable[str]] = None,
                       converter: Optional[str] = None, renaming_only: bool = False) -> ConversionResult:
    """Convert a foreign checkpoint (or its state dict) to d2seg's names.

    Args:
        checkpoint: {"model": S, ...} or S.
        source: "auto" or one of :data:`SOURCES`; restricts which converters may match.
        target_keys: the keys of the model the result is for (``model.state_dict()``);
            decides which recomputed buffers are dropped. None: drop them all.
        converter: force this converter by name instead of detecting.
        renaming_only: with "auto" detection, use only converters that rename keys.
    Raises:
        ValueError if ``source`` is not "auto" and no converter of it recognises the keys.
    """
    sd = unwrap(checkpoint)
    conv = get_converter(converter) if converter else detect_format(sd, source, renaming_only)
    if conv is None and source != "auto":
        names = [c.name for c in list_converters(source)]
        sample = sorted(sd)[:8]
        raise ValueError(f"the checkpoint is not in a {source} format that d2seg knows ({names}); "
                         f"its first keys are {sample}")
    cleaned, origin = _clean(sd)
    converted = conv.convert(cleaned) if conv is not None else cleaned
    # Trace every output key to its source key: converters rename one key at a time, except
    # MEInst's DCNv1 -> DCNv2 step, which also creates offset/conv biases ("added").
    mapped, added, dropped = {}, {}, {}
    if conv is not None and conv.renames:
        for key, src in origin.items():
            if conv.rename_key is not None:
                outs = [conv.rename_key(key)]
            else:
                outs = list(conv.convert({key: cleaned[key]}))
            if not outs:
                dropped[src] = f"dropped by {conv.name}"
                continue
            mapped[src] = outs[0]
            for extra in outs[1:]:
                added[extra] = src
    else:
        mapped = {src: key for key, src in origin.items()}
    # Buffers the target model recomputes (decided on d2seg's names).
    target = set(target_keys) if target_keys is not None else None
    for src, dst in list(mapped.items()):
        why = _recomputed(dst, target)
        if why is not None:
            dropped[src] = why
            del mapped[src]
            converted.pop(dst, None)
    targets = set(mapped.values())
    added = {k: v for k, v in added.items() if k not in targets and k in converted}
    for k in converted:
        if k not in targets and k not in added:
            added[k] = f"created by {conv.name}"
    return ConversionResult(converted, conv, mapped, dropped, added)


def compare_with_model(state_dict: Dict, model_state: Dict) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, shape mismatches) of ``state_dict`` against a model's
    ``state_dict()``; ``num_batches_tracked`` of the model is never required."""
    missing = sorted(k for k in model_state if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state_dict if k not in model_state)
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in state_dict
        if k in model_state and tuple(state_dict[k].shape) != tuple(model_state[k].shape)
    )
    return missing, unexpected, shapes


def mismatch_message(missing, unexpected, shapes, what="the checkpoint", limit=20) -> str:
    def fmt(title, items):
        if not items:
            return ""
        text = f"\n  {title} ({len(items)}): " + ", ".join(items[:limit])
        if len(items) > limit:
            groups = {}
            for k in items:
                g = ".".join(k.split(":")[0].split(".")[:2])
                groups[g] = groups.get(g, 0) + 1
            text += f" ... and {len(items) - limit} more; by module: " + ", ".join(
                f"{g}.* ({n})" for g, n in sorted(groups.items()))
        return text

    return (f"{what} does not match the model:" + fmt("missing in the checkpoint", missing)
            + fmt("unexpected (not in the model)", unexpected) + fmt("shape mismatches", shapes))
