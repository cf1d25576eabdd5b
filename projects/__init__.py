"""d2seg: instance and semantic segmentation methods for Detectron2.

Importing `d2seg` registers every method's meta-architectures and heads in Detectron2's
registries and the built-in `shapes_*` data sets in its catalogs. Use
:func:`add_d2seg_config` on a Detectron2 config before merging a d2seg YAML file.
"""
import warnings

# Detectron2 imports fvcore.nn, whose module-level torch.jit.script calls print a
# FutureWarning twice with PyTorch 2.14 (which deprecates torch.jit.script). It is fvcore's
# (`import detectron2.modeling` prints it too) and says nothing about d2seg: it is ignored
# while d2seg imports Detectron2, and that one filter is removed afterwards. (Not
# warnings.catch_warnings(): it would also drop the filters that PyTorch and others install
# when they are first imported here.)
_FILTERS_BEFORE = list(warnings.filters)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
_FVCORE_JIT_FILTER = warnings.filters[0]
try:
    from .config import add_d2seg_config, get_d2seg_cfg

    # Importing the sub-packages fills Detectron2's registries (meta-architectures, heads)
    # and catalogs (data sets). Keep these imports: they are the registration.
    from . import layers  # noqa: F401  (compiled ops and their references)
    from . import data  # noqa: F401  (registers shapes_train / shapes_val)
    from . import modeling  # noqa: F401  (every method's registry entries)
    from . import model_zoo  # noqa: F401  (d2seg:// checkpoint names in Detectron2's PathManager)
finally:
    if _FVCORE_JIT_FILTER in warnings.filters and _FVCORE_JIT_FILTER not in _FILTERS_BEFORE:
        warnings.filters.remove(_FVCORE_JIT_FILTER)
    del _FVCORE_JIT_FILTER, _FILTERS_BEFORE

__version__ = "0.1.0"
__all__ = ["add_d2seg_config", "get_d2seg_cfg", "__version__"]
