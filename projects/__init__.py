"""d2seg: instance and semantic segmentation methods for Detectron2.

Importing `d2seg` registers every method's meta-architectures and heads in Detectron2's
registries and the built-in `shapes_*` data sets in its catalogs. Use
:func:`add_d2seg_config` on a Detectron2 config before merging a d2seg YAML file.
"""
from .config import add_d2seg_config, get_d2seg_cfg

# Importing the sub-packages fills Detectron2's registries (meta-architectures, heads)
# and catalogs (data sets). Keep these imports: they are the registration.
from . import layers  # noqa: F401  (compiled ops and their references)
from . import data  # noqa: F401  (registers shapes_train / shapes_val)
from . import modeling  # noqa: F401  (every method's registry entries)
from . import model_zoo  # noqa: F401  (d2seg:// checkpoint names in Detectron2's PathManager)

__version__ = "0.1.0"
__all__ = ["add_d2seg_config", "get_d2seg_cfg", "__version__"]
