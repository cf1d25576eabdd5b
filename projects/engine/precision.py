"""Inference precision, ``TEST.PRECISION``: float32 (the default) or bfloat16 autocast.

With ``TEST.PRECISION bfloat16`` the model's forward pass runs under
``torch.autocast(device_type, dtype=torch.bfloat16)`` (the device type of its parameters,
"cpu" or "cuda"); its results are cast back to float32 (boxes, scores, semantic scores;
masks stay boolean), so evaluators, drawing and serialisation see what they see in float32.
Read by :meth:`d2seg.engine.Trainer.test` (evaluation), :class:`d2seg.engine.Predictor`
(tools/demo.py) and the benchmark worker (tools/benchmark.py); refused by
``d2seg.deploy.ONNXModel`` / ``ONNXPredictor`` (ONNX Runtime has no bfloat16 CPU kernels for these graphs).

The per-candidate score layers (:data:`SCORE_LAYERS`: the class logits of Detectron2's box
predictor, used by Mask R-CNN and PointRend; SparseInst's class and objectness logits) stay in
float32 unless ``TEST.FLOAT32_SCORES`` is False: rounded to bfloat16's 8-bit mantissa, scores
tie and swap places in the ranking that COCO AP is computed from.

bfloat16 is only worth it on a CPU with native bfloat16 arithmetic (AVX-512 BF16 or AMX):
elsewhere PyTorch emulates it, more slowly than float32, so asking for it there is an error.
``D2SEG_CPU_BF16=0`` / ``=1`` overrides the detection (tests simulate a CPU without it;
``=1`` forces bfloat16 on a CPU without it, e.g. to check accuracy).
"""
import contextlib
import os
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.structures import Boxes, Instances

__all__ = ["PRECISIONS", "inference_precision", "cpu_has_bf16", "check_precision_supported",
           "AtPrecision", "at_precision", "outputs_to_float32", "SCORE_LAYERS", "score_layers",
           "float32_modules"]

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
CPU_BF16_ENV = "D2SEG_CPU_BF16"
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


# The score layers kept in float32 under TEST.PRECISION bfloat16 (TEST.FLOAT32_SCORES): a
# module of one of these classes (by qualified name, subclasses included: nothing is imported
# for it) keeps these children in float32. Only per-candidate layers (a Linear on one feature
# vector per proposal / instance: negligible work) are listed; the dense score maps of FCOS,
# RetinaNet and SOLO (convolutions over every position of every level) stay in bfloat16: in
# float32 they cost FCOS R-50 at 800x1216 about 7 % of its bfloat16 time and changed none of
# those methods' held-out AP beyond the noise (docs/deploy.md, "Precision").
SCORE_LAYERS: Dict[str, Tuple[str, ...]] = {
    "detectron2.modeling.roi_heads.fast_rcnn.FastRCNNOutputLayers": ("cls_score",),
    "d2seg.sparseinst.decoder.InstanceBranch": ("cls_score", "objectness"),
}


def score_layers(model: torch.nn.Module) -> List[str]:
    """The names (as in ``model.named_modules()``) of ``model``'s score layers
    (:data:`SCORE_LAYERS`), in module order."""
    names = []
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            children = SCORE_LAYERS.get(f"{cls.__module__}.{cls.__qualname__}")
            if children:
                names += [f"{name}.{c}" if name else c for c in children if getattr(module, c, None) is not None]
                break
    return names


@contextlib.contextmanager
def _in_float32(modules: List[torch.nn.Module], device_type: str):
    """Within the block, ``modules`` run in float32 under autocast (autocast off in their
    forward, their floating inputs cast to float32); each one's ``forward`` is put back on exit."""
    saved = []
    try:
        for module in modules:
            saved.append((module, module.__dict__.get("forward")))
            inner = module.forward

            def forward(*args, _inner=inner, **kwargs):
                with torch.autocast(device_type, enabled=False):
                    return _inner(*_float32(list(args)), **{k: _float32(v) for k, v in kwargs.items()})

            module.forward = forward
        yield
    finally:
        for module, before in reversed(saved):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before


def float32_modules(model: torch.nn.Module, names: List[str], device_type: str = "cpu"):
    """A context manager: within it, the modules ``names`` of ``model`` (as in
    ``model.named_modules()``) run in float32 under autocast, autocast off in their forward and
    their floating inputs cast to float32. Their ``forward`` is put back on exit (the model is
    not changed). Raises KeyError naming a module ``model`` does not have."""
    return _in_float32(_submodules(model, names), device_type)


def _submodules(model: torch.nn.Module, names: List[str]) -> List[torch.nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"{type(model).__name__} has no module named {', '.join(missing)}")
    return [modules[n] for n in names]


def inference_precision(cfg) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg.TEST.PRECISION`` (None for float32: no autocast).

    Raises:
        ValueError naming the key when the value is not one of :data:`PRECISIONS`.
    """
    name = cfg.TEST.get("PRECISION", "float32")
    if name not in PRECISIONS:
        raise ValueError(f"TEST.PRECISION: unknown precision {name!r}; expected one of "
                         f"{', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16``
    flag of /proc/cpuinfo). The environment variable ``D2SEG_CPU_BF16`` (0 or 1) overrides it."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={forced!r}: expected 0 or 1")
        return forced == "1"
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in _CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def check_precision_supported(dtype: Optional[torch.dtype], device_type: str) -> None:
    """Raise RuntimeError (naming TEST.PRECISION) when ``device_type`` ("cpu" / "cuda") cannot
    compute in ``dtype`` natively; float32 (None) is always supported."""
    if dtype is None:
        return
    if device_type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"TEST.PRECISION bfloat16: this GPU ({torch.cuda.get_device_name()}) has no "
                               "bfloat16 support; use TEST.PRECISION float32")
        return
    if not cpu_has_bf16():
        raise RuntimeError(
            "TEST.PRECISION bfloat16: this CPU has no native bfloat16 arithmetic (neither avx512_bf16 nor "
            f"amx_bf16 among the flags of /proc/cpuinfo; torch's CPU capability is "
            f"{torch.backends.cpu.get_cpu_capability()}), where PyTorch would emulate bfloat16 more slowly "
            f"than float32. Use TEST.PRECISION float32, or set {CPU_BF16_ENV}=1 to run bfloat16 anyway.")


def _device_type(model) -> str:
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return param.device.type if param is not None else "cpu"


class AtPrecision(torch.nn.Module):
    """``model`` whose calls run under ``torch.autocast(device_type, dtype)`` and return
    float32 results (:func:`outputs_to_float32`), the modules named by ``float32_layers``
    (:func:`score_layers` by :func:`at_precision`) run in float32 (:func:`float32_modules`).
    ``model`` stays the wrapped module's ``model`` attribute (its parameters are not copied
    or cast)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device_type: str,
                 float32_layers: Optional[List[str]] = None):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device_type = device_type
        self.float32_layers = list(float32_layers or [])
        self._float32_modules = _submodules(model, self.float32_layers)  # once, not on every call

    def forward(self, *args, **kwargs):
        """The model's outputs under autocast, floating tensors cast to float32. An op without
        a kernel for the autocast dtype raises its own error with a note naming TEST.PRECISION."""
        try:
            with torch.autocast(self.device_type, dtype=self.dtype), \
                    _in_float32(self._float32_modules, self.device_type):
                outputs = self.model(*args, **kwargs)
        except RuntimeError as e:  # NotImplementedError included: "... not implemented for 'BFloat16'"
            e.add_note(f"(raised while {type(self.model).__name__} ran at TEST.PRECISION "
                       f"{str(self.dtype).replace('torch.', '')} under torch.autocast('{self.device_type}'): "
                       "an op of the model may have no kernel for that dtype; TEST.PRECISION float32 avoids it)")
            raise
        return outputs_to_float32(outputs)


def at_precision(cfg, model):
    """``model`` run at ``cfg.TEST.PRECISION``: itself for float32, an :class:`AtPrecision`
    wrapper for bfloat16 (after :func:`check_precision_supported` on the model's device).

    Raises:
        ValueError for an unknown TEST.PRECISION or a model that is not a PyTorch module
        (an exported ONNX file); RuntimeError where the device lacks bfloat16 support.
    """
    dtype = inference_precision(cfg)
    if dtype is None:
        return model
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"TEST.PRECISION bfloat16 needs a PyTorch model; {type(model).__name__} is not one "
                         "(an exported ONNX file runs in float32: use TEST.PRECISION float32)")
    param = next(model.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"
    check_precision_supported(dtype, device_type)
    keep = score_layers(model) if cfg.TEST.get("FLOAT32_SCORES", True) else []
    return AtPrecision(model, dtype, device_type, keep)


def _float32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, Boxes):
        return type(value)(_float32(value.tensor))
    if isinstance(value, Instances):
        out = Instances(value.image_size)
        for name, field in value.get_fields().items():
            out.set(name, _float32(field))
        return out
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_float32(v) for v in value)
    return value


def outputs_to_float32(outputs):
    """A model's results (list of dicts, a dict, Instances, tensors) with every floating
    tensor in float32: Instances' fields (Boxes included), ``sem_seg``, ``proposals``.
    Boolean masks and integer classes are kept; float32 results are returned unchanged."""
    return _float32(outputs)
